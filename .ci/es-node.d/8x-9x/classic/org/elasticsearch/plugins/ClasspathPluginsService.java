// Serves a fixed list of plugin classes from the classpath instead of what the modules/ and
// plugins/ folders hold (kept empty). For Elasticsearch 8.x before PluginsLoader. In
// Elasticsearch's package for the package-private LoadedPlugin and loadPlugin.
package org.elasticsearch.plugins;

import java.util.List;
import java.util.Map;

import org.elasticsearch.Build;
import org.elasticsearch.common.settings.Settings;
import org.elasticsearch.env.Environment;
import org.elasticsearch.jdk.ModuleQualifiedExportsService;

public class ClasspathPluginsService extends PluginsService {

    private final List<LoadedPlugin> loaded;

    public ClasspathPluginsService(Settings settings, Environment env, List<Class<? extends Plugin>> classes) {
        super(settings, env.configFile(), env.modulesFile(), env.pluginsFile()); // finds nothing
        loaded = classes.stream().map(c -> new LoadedPlugin(descriptor(c), loadPlugin(c, settings, env.configFile()))).toList();
        loadExtensions(loaded);
    }

    // Only names and classes matter here: the node lists them in its info and keys them by name.
    private static PluginDescriptor descriptor(Class<? extends Plugin> c) {
        return new PluginDescriptor(c.getSimpleName(), "from the classpath", "0", Build.current().version(),
            Integer.toString(Runtime.version().feature()), c.getName(), null, List.of(), false, false, false, false);
    }

    // Called by the super constructor: the real one reads the server's module descriptor, and
    // on the classpath the server is no named module (NullPointerException); nothing to export.
    @Override
    protected void addServerExportsService(Map<String, List<ModuleQualifiedExportsService>> exports) {}

    @Override
    protected List<LoadedPlugin> plugins() {
        return loaded;
    }
}
