//! The RabbitMQ backend under the shared fault suite (`broker_testkit::faults`) on the real
//! RabbitMQ (`BROKER_TEST_AMQP_URL`), through the testkit's loopback proxy: down for the whole run,
//! a black hole mid-stream (no confirms: not ready within `confirm_timeout`, nothing lost once it
//! answers again), and refused connections then recovery. Read back from the queue directly.

mod common;

use broker_core::{ConfigValue, async_trait};
use broker_pika::PikaBackend;
use broker_testkit::faults::{self, FaultOptions, FaultTarget, Faulty};

struct RabbitMq {
    url: String,
    made: std::sync::Mutex<Vec<(String, String)>>,
}

#[async_trait]
impl FaultTarget for RabbitMq {
    fn name(&self) -> String {
        "pika".into()
    }

    async fn fresh(&self, options: &FaultOptions) -> Faulty {
        let queue = common::name("faults-q");
        let exchange = common::name("faults-x");
        self.made.lock().unwrap().push((queue.clone(), exchange.clone()));
        let extra = [
            ("confirm_timeout", ConfigValue::Float(options.attempt_timeout.as_secs_f64())),
            ("close_timeout", ConfigValue::Float(options.close_timeout.as_secs_f64())),
            ("retry_delay_in_seconds", ConfigValue::Float(0.5)),
        ];
        let proxy = common::proxy(&self.url).await;
        let via = common::proxied_url(&proxy, &self.url);
        Faulty {
            backend: Box::new(PikaBackend::new(common::config_with(&via, &[&queue], &exchange, &extra))),
            outage: Box::new(proxy),
            reader: Box::new(PikaBackend::new(common::config_with(&self.url, &[&queue], &exchange, &extra))),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_keeps_the_contract_under_faults() {
    let Some(service) = broker_testkit::services::rabbitmq("rabbitmq_keeps_the_contract_under_faults").await else {
        return;
    };
    let target = RabbitMq { url: service.url.clone(), made: Default::default() };
    faults::run_all(&target).await;
    let made: Vec<(String, String)> = target.made.lock().unwrap().drain(..).collect();
    for (q, x) in made {
        common::cleanup(&service.url, &[&q], &[&x]).await;
    }
}
