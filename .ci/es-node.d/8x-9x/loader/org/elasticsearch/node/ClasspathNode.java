// A Node whose plugins are classes already on the classpath, for Elasticsearch with
// PluginsLoader (8.19, 9.x; tested on 8.19.21, 9.1.0, 9.5.3). The real launcher loads each
// module from its folder in its own class loader, and no public constructor takes plugin
// classes any more; so this class sits in Elasticsearch's package to reach the
// package-private NodeConstruction.
package org.elasticsearch.node;

import java.util.List;

import org.elasticsearch.env.Environment;
import org.elasticsearch.plugins.ClasspathPluginsService;
import org.elasticsearch.plugins.Plugin;
import org.elasticsearch.plugins.PluginsLoader;
import org.elasticsearch.plugins.PluginsService;

public class ClasspathNode extends Node {

    public ClasspathNode(Environment env, List<Class<? extends Plugin>> plugins) {
        super(NodeConstruction.prepareConstruction(env, ClasspathPluginsService.emptyLoader(), new NodeServiceProvider() {
            @Override
            PluginsService newPluginService(Environment environment, PluginsLoader unused) {
                return new ClasspathPluginsService(environment.settings(), environment, plugins);
            }
        }, true));
    }
}
