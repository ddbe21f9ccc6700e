//! OpenTelemetry export: a broker started with `--otlp-endpoint` sends its request spans to an
//! OTLP/gRPC collector (a fake one here, on loopback), tagged with the service name.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_client::{Client, ConsumerConfig, ProducerConfig, ProducerRecord, SeekTo};
use keel_tests::broker::BrokerProc;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

#[derive(Default, Clone)]
struct Collector {
    /// (service name, span name) of every span received.
    spans: Arc<Mutex<Vec<(String, String)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.spans.lock().expect("lock");
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    out.push((service.clone(), span.name));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_exports_request_spans_over_otlp() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let endpoint = format!("http://{addr}");
    let mut broker = BrokerProc::start_with(dir.path(), 1, &["--otlp-endpoint", &endpoint]);
    let client = Client::connect(&[broker.grpc.clone()])
        .await
        .expect("connect");
    client
        .admin()
        .create_topic("traced", 1, 1, Default::default())
        .await
        .expect("create");
    let producer = client
        .producer(ProducerConfig::default())
        .expect("producer");
    producer
        .send(ProducerRecord::new("traced", "hello"))
        .await
        .expect("send")
        .await
        .expect("ack");
    producer.close().await.expect("close");
    let mut consumer = client.consumer(ConsumerConfig::default());
    consumer.assign(&[("traced", 0)]);
    consumer
        .seek("traced", 0, SeekTo::Beginning)
        .await
        .expect("seek");
    let got = consumer.poll(Duration::from_secs(5)).await.expect("poll");
    assert_eq!(got.len(), 1);

    // The batch exporter sends every few seconds; a graceful stop flushes the rest.
    let status = broker.terminate();
    assert!(status.success(), "{status}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let names = loop {
        let names: BTreeSet<(String, String)> = collector
            .spans
            .lock()
            .expect("lock")
            .iter()
            .cloned()
            .collect();
        let has = |n: &str| {
            names
                .iter()
                .any(|(s, name)| s == "keel-broker" && name == n)
        };
        if has("create_topic") && has("fetch") && (has("produce") || has("produce_stream")) {
            break names;
        }
        assert!(
            Instant::now() < deadline,
            "spans received so far: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("spans: {names:?}");
    server.abort();
}
