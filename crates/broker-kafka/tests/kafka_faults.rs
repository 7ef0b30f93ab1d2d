//! The Kafka backend under the shared fault suite (`broker_testkit::faults`): a Kafka-protocol
//! broker of the test's own (tansu, see `common`) behind the testkit's loopback proxy, advertising
//! the proxy's address so every connection librdkafka opens goes through it: down for the whole
//! run, a black hole mid-stream, refused connections then recovery.

mod common;

use broker_core::{DeliveryOptions, async_trait};
use broker_kafka::{KafkaBackend, KafkaConfig};
use broker_testkit::faults::{self, FaultOptions, FaultTarget, Faulty, Outage};
use broker_testkit::proxy::Proxy;
use common::Tansu;

struct Kafka {
    root: String,
    /// The brokers started, stopped when the test ends.
    running: std::sync::Mutex<Vec<std::sync::Arc<Tansu>>>,
}

/// The proxy, keeping its broker alive as long as the backend under test needs it.
struct Switch {
    proxy: Proxy,
    _broker: std::sync::Arc<Tansu>,
}

#[async_trait]
impl Outage for Switch {
    async fn refuse(&self) {
        self.proxy.refuse().await;
    }
    async fn black_hole(&self) {
        self.proxy.black_hole();
    }
    async fn restore(&self) {
        self.proxy.restore();
    }
}

#[async_trait]
impl FaultTarget for Kafka {
    fn name(&self) -> String {
        "kafka".into()
    }

    async fn fresh(&self, options: &FaultOptions) -> Faulty {
        let mut tansu = Tansu::new(self.root.clone(), None);
        let proxy = Proxy::start(&format!("127.0.0.1:{}", tansu.port)).await.expect("start the proxy");
        tansu.advertised = format!("127.0.0.1:{}", proxy.port());
        let tansu = std::sync::Arc::new(tansu);
        let started = tansu.clone();
        tokio::task::spawn_blocking(move || started.run(&["start", "memory"])).await.expect("start tansu");
        self.running.lock().unwrap().push(tansu.clone());
        let topic = format!("faults-{}", broker_testkit::services::unique_suffix());
        let delivery = DeliveryOptions::default().close_timeout(options.close_timeout);
        let bootstrap = format!("127.0.0.1:{}", proxy.port());
        let config = KafkaConfig::plaintext(&bootstrap, &topic).create_topic(1, 1).delivery(delivery);
        Faulty {
            backend: Box::new(KafkaBackend::new(config.clone())),
            outage: Box::new(Switch { proxy, _broker: tansu }),
            reader: Box::new(KafkaBackend::new(config)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_keeps_the_contract_under_faults() {
    let Some(root) = Tansu::root("kafka_keeps_the_contract_under_faults") else { return };
    let target = Kafka { root, running: Default::default() };
    faults::run_all(&target).await;
    target.running.lock().unwrap().clear();
}
