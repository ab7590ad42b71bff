// Embedded single-node Elasticsearch 8.x or 9.x for tests; started by ../../es-node.
// Usage: java -cp 'jars/*:classes' EsNode <home-dir> <http-port>
// Compiled with one of classic/ or loader/ (ClasspathNode, ClasspathPluginsService): the
// two ways Elasticsearch has had of building a Node, picked by es-node from the jars.
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;

import org.elasticsearch.common.logging.LogConfigurator;
import org.elasticsearch.common.settings.Settings;
import org.elasticsearch.env.Environment;
import org.elasticsearch.node.ClasspathNode;
import org.elasticsearch.node.InternalSettingsPreparer;
import org.elasticsearch.node.Node;
import org.elasticsearch.transport.netty4.Netty4Plugin;

public class EsNode {

    public static void main(String[] args) throws Exception {
        Path home = Path.of(args[0]).toAbsolutePath();
        // The node reads these folders (plugins come from the classpath instead: keep them empty).
        for (String dir : List.of("modules", "plugins", "config")) {
            Files.createDirectories(home.resolve(dir));
        }
        // Set by the real launcher; 9.x reads it while starting.
        System.setProperty("es.path.home", home.toString());
        // The real launcher installs Elasticsearch's logging bridge; without it the first
        // logger lookup fails with a NullPointerException.
        LogConfigurator.configureESLogging();
        Settings settings = Settings.builder()
            .put("path.home", home.toString())
            .put("path.data", home.resolve("data").toString())
            .put("path.logs", home.resolve("logs").toString())
            .put("cluster.name", "schedule-api-ci")
            .put("node.name", "node-1")
            .put("discovery.type", "single-node")
            .put("network.host", "127.0.0.1")
            .put("http.port", args[1])
            // Any free port: nobody joins a single node, and nodes run side by side never clash.
            .put("transport.port", "0")
            .put("cluster.routing.allocation.disk.threshold_enabled", false)
            .build();
        Node node;
        try {
            Environment env = InternalSettingsPreparer.prepareEnvironment(settings, Map.of(), null, () -> "node-1");
            node = new ClasspathNode(env, List.of(Netty4Plugin.class));
            RootHandler.register(node);
            node.start();
        } catch (Throwable t) { // e.g. port taken: exit instead of lingering half-started
            t.printStackTrace();
            System.exit(1);
            return;
        }
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                node.close();
                node.awaitClose(20, TimeUnit.SECONDS);
            } catch (Exception e) {
                e.printStackTrace();
            }
        }));
        Thread.currentThread().join(); // block until killed
    }
}
