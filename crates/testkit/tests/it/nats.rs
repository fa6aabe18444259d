//! A real nats-server: starts, serves a JetStream round trip, dies, restarts on its port.

use std::time::Duration;

use testkit::NatsServer;

#[tokio::test]
async fn nats_server_starts_dies_and_restarts_on_the_same_port_and_store() {
    let Some(mut nats) = testkit::require("nats", NatsServer::start()) else { return };
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "T".into(),
        subjects: vec!["t.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let ack = js.publish("t.a", "one".into()).await.unwrap().await.unwrap();
    assert_eq!(ack.sequence, 1);

    let port = nats.port();
    nats.kill();
    assert!(!nats.is_running());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "port still served");

    nats.restart().unwrap();
    assert_eq!(nats.port(), port);
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    // Debian's 2.9 syncs lazily, so after a SIGKILL the stream may or may not hold the
    // message; the stream definition itself was written before the kill returned.
    let mut stream =
        tokio::time::timeout(Duration::from_secs(10), js.get_stream("T")).await.unwrap().unwrap();
    assert_eq!(stream.info().await.unwrap().config.name, "T");
}
