// Serves a fixed list of plugin classes from the classpath instead of what a PluginsLoader
// found in the modules/ and plugins/ folders (kept empty). For Elasticsearch with
// PluginsLoader (8.19, 9.x). In Elasticsearch's package for the package-private LoadedPlugin
// and loadPlugin.
package org.elasticsearch.plugins;

import java.lang.reflect.Constructor;
import java.util.List;
import java.util.Map;
import java.util.Set;

import org.elasticsearch.Build;
import org.elasticsearch.common.settings.Settings;
import org.elasticsearch.env.Environment;

public class ClasspathPluginsService extends PluginsService {

    private final List<LoadedPlugin> loaded;

    public ClasspathPluginsService(Settings settings, Environment env, List<Class<? extends Plugin>> classes) {
        super(settings, env.configDir(), emptyLoader());
        ClassLoader loader = ClasspathPluginsService.class.getClassLoader();
        loaded = classes.stream().map(c -> new LoadedPlugin(descriptor(c), loadPlugin(c, settings, env.configDir()), loader)).toList();
        loadExtensions(loaded);
    }

    /** A loader with no modules and no plugins. */
    public static PluginsLoader emptyLoader() {
        // false: skip the server's qualified exports, read from its module descriptor; on the
        // classpath the server is no named module (NullPointerException) and exports nothing.
        return PluginsLoader.createPluginsLoader(Set.of(), Set.of(), Map.of(), false);
    }

    // Only names and classes matter here: the node lists them in its info and keys them by name.
    // Reflection because 9.5 added a trailing DeploymentTarget parameter (given ALL).
    private static PluginDescriptor descriptor(Class<? extends Plugin> c) {
        Object[] known = { c.getSimpleName(), "from the classpath", "0", Build.current().version(),
            Integer.toString(Runtime.version().feature()), c.getName(), null, List.of(), false, false, false, false };
        for (Constructor<?> ctor : PluginDescriptor.class.getConstructors()) {
            Class<?>[] types = ctor.getParameterTypes();
            if (types.length < known.length || types[0] != String.class) {
                continue;
            }
            Object[] args = java.util.Arrays.copyOf(known, types.length);
            for (int i = known.length; i < types.length; i++) {
                args[i] = enumConstant(types[i], "ALL");
            }
            try {
                return (PluginDescriptor) ctor.newInstance(args);
            } catch (ReflectiveOperationException e) {
                throw new IllegalStateException("cannot describe plugin " + c.getName(), e);
            }
        }
        throw new IllegalStateException("no known PluginDescriptor constructor");
    }

    @SuppressWarnings({ "unchecked", "rawtypes" })
    private static Object enumConstant(Class<?> type, String name) {
        if (!type.isEnum()) {
            throw new IllegalStateException("unexpected PluginDescriptor parameter " + type.getName());
        }
        return Enum.valueOf((Class<? extends Enum>) type, name);
    }

    @Override
    protected List<LoadedPlugin> plugins() {
        return loaded;
    }
}
