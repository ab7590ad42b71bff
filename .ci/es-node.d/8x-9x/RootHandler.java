// Stand-in for Elasticsearch's rest-root module (not published on Maven Central for 8.x/9.x):
// GET / describes the node and HEAD / answers 200, as clients expect before anything else
// (the 7.17 Python client's product check, ping()). X-Elastic-Product is added by the server
// to every response.
//
// Registered on the node's RestController rather than through a plugin's getRestHandlers,
// whose signature changed in 9.5: this way one source compiles against every 8.x and 9.x.
import java.util.List;

import org.elasticsearch.Build;
import org.elasticsearch.client.internal.node.NodeClient;
import org.elasticsearch.cluster.ClusterState;
import org.elasticsearch.cluster.service.ClusterService;
import org.elasticsearch.common.bytes.BytesArray;
import org.elasticsearch.node.Node;
import org.elasticsearch.rest.BaseRestHandler;
import org.elasticsearch.rest.RestController;
import org.elasticsearch.rest.RestRequest;
import org.elasticsearch.rest.RestResponse;
import org.elasticsearch.rest.RestStatus;
import org.elasticsearch.xcontent.XContentBuilder;

final class RootHandler extends BaseRestHandler {

    private final ClusterService clusterService;

    private RootHandler(ClusterService clusterService) {
        this.clusterService = clusterService;
    }

    /** Call between constructing the node and starting it. */
    static void register(Node node) {
        RootHandler handler = new RootHandler(node.injector().getInstance(ClusterService.class));
        node.injector().getInstance(RestController.class).registerHandler(handler);
    }

    @Override
    public String getName() {
        return "schedule_api_ci_root";
    }

    @Override
    public List<Route> routes() {
        return List.of(new Route(RestRequest.Method.GET, "/"), new Route(RestRequest.Method.HEAD, "/"));
    }

    @Override
    protected RestChannelConsumer prepareRequest(RestRequest request, NodeClient client) {
        if (request.method() == RestRequest.Method.HEAD) {
            return channel -> channel.sendResponse(new RestResponse(RestStatus.OK, "application/json", BytesArray.EMPTY));
        }
        ClusterState state = clusterService.state();
        Build build = Build.current();
        return channel -> {
            XContentBuilder body = channel.newBuilder();
            body.startObject()
                .field("name", clusterService.getNodeName())
                .field("cluster_name", state.getClusterName().value())
                .field("cluster_uuid", state.metadata().clusterUUID())
                .startObject("version")
                .field("number", build.version())
                .field("build_flavor", "default") // what clients before 7.14 check
                .field("build_type", build.type().displayName())
                .field("build_hash", build.hash())
                .field("build_date", build.date())
                .field("build_snapshot", build.isSnapshot())
                .field("lucene_version", org.apache.lucene.util.Version.LATEST.toString())
                .field("minimum_wire_compatibility_version", build.minWireCompatVersion())
                .field("minimum_index_compatibility_version", build.minIndexCompatVersion())
                .endObject()
                .field("tagline", "You Know, for Search")
                .endObject();
            channel.sendResponse(new RestResponse(RestStatus.OK, body));
        };
    }
}
