// Embedded single-node Elasticsearch 7.17 for tests; started by ../es-node.
// Usage: java -cp 'jars/*:classes' EsNode <home-dir> <http-port>
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;

import org.elasticsearch.common.settings.Settings;
import org.elasticsearch.node.InternalSettingsPreparer;
import org.elasticsearch.node.Node;
import org.elasticsearch.reindex.ReindexPlugin;
import org.elasticsearch.transport.Netty4Plugin;

public class EsNode extends Node {

    EsNode(Settings settings) {
        // Plugins come from the classpath instead of the modules/ folder.
        super(InternalSettingsPreparer.prepareEnvironment(settings, Map.of(), null, () -> "node-1"),
              List.of(Netty4Plugin.class, ReindexPlugin.class), true);
    }

    public static void main(String[] args) throws Exception {
        Path home = Path.of(args[0]).toAbsolutePath();
        // Node scans these folders for extra plugins; they must exist (and stay empty).
        Files.createDirectories(home.resolve("modules"));
        Files.createDirectories(home.resolve("plugins"));
        Settings settings = Settings.builder()
            .put("path.home", home.toString())
            .put("path.data", home.resolve("data").toString())
            .put("path.logs", home.resolve("logs").toString())
            .put("cluster.name", "schedule-api-ci")
            .put("node.name", "node-1")
            .put("discovery.type", "single-node")
            .put("network.host", "127.0.0.1")
            .put("http.port", args[1])
            .put("cluster.routing.allocation.disk.threshold_enabled", false)
            .build();
        EsNode node;
        try {
            node = new EsNode(settings);
            node.start();
        } catch (Throwable t) { // e.g. port taken: exit instead of lingering half-started
            t.printStackTrace();
            System.exit(1);
            return;
        }
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                node.close();
            } catch (Exception e) {
                e.printStackTrace();
            }
        }));
        Thread.currentThread().join(); // block until killed
    }
}
