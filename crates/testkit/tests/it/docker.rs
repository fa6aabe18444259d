//! The Docker path: `keel/nats:dev` (built locally by scripts/images.sh, no registry)
//! started by testcontainers, with a JetStream publish round-tripped through it.

use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{GenericImage, ImageExt};

fn docker_available() -> anyhow::Result<()> {
    let out = std::process::Command::new("docker")
        .args(["image", "inspect", "keel/nats:dev"])
        .output()
        .map_err(|err| anyhow::anyhow!("no docker client: {err}"))?;
    anyhow::ensure!(
        out.status.success(),
        "image keel/nats:dev missing or no Docker engine (run scripts/images.sh): {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

#[tokio::test]
async fn keel_nats_image_serves_jetstream() {
    if testkit::require("docker", docker_available()).is_none() {
        return;
    }
    let container = GenericImage::new("keel/nats", "dev")
        .with_exposed_port(4222.tcp())
        .with_wait_for(WaitFor::message_on_stderr("Server is ready"))
        .with_cmd(["-js", "-sd", "/data"])
        .start()
        .await
        .expect("start keel/nats:dev");
    let host = container.get_host().await.unwrap();
    let port = container.get_host_port_ipv4(4222).await.unwrap();

    let client = async_nats::connect(format!("nats://{host}:{port}")).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "DOCKER".into(),
        subjects: vec!["docker.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let ack = js.publish("docker.hello", "hi".into()).await.unwrap().await.unwrap();
    assert_eq!((ack.stream.as_str(), ack.sequence), ("DOCKER", 1));
    let stream = js.get_stream("DOCKER").await.unwrap();
    let msg = stream.get_raw_message(1).await.unwrap();
    assert_eq!(msg.payload.as_ref(), b"hi");
}
