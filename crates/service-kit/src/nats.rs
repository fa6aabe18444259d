//! The NATS connection every service holds: connects in the background, retries with
//! backoff forever, and reports its state into the readiness registry as `nats`.

use std::time::Duration;

use async_nats::{ConnectOptions, Event};

use crate::readiness::{ComponentState, Readiness, Role};

/// Name of the readiness component fed by the connection.
pub const COMPONENT: &str = "nats";
/// Delay before the second connection attempt; doubles per attempt up to
/// [`RECONNECT_DELAY_MS_MAX`] (the first attempt is not delayed).
pub const RECONNECT_DELAY_MS_MIN: u64 = 50;
/// Longest wait between reconnect attempts.
pub const RECONNECT_DELAY_MS_MAX: u64 = 2_000;
/// Time limit for one connection attempt.
pub const CONNECT_TIMEOUT_MS: u64 = 2_000;

/// How long a service waits, on its way out, for NATS to take what it buffered.
pub const FLUSH_ON_EXIT_TIMEOUT_MS: u64 = 1_000;

/// Flushes `client` but gives up after [`FLUSH_ON_EXIT_TIMEOUT_MS`]: with the server gone a
/// plain `flush` waits for a reconnection that may never come, and a shutdown must not hang.
pub async fn flush_on_exit(client: &async_nats::Client) {
    let flush = client.flush();
    if tokio::time::timeout(Duration::from_millis(FLUSH_ON_EXIT_TIMEOUT_MS), flush).await.is_err() {
        tracing::warn!("nats flush on exit timed out (server unreachable)");
    }
}

/// Delay before connection attempt number `attempts` (async-nats counts from 1, and asks
/// before the very first attempt too): none for the first, then doubling from
/// `RECONNECT_DELAY_MS_MIN` up to `RECONNECT_DELAY_MS_MAX`. (Delaying the first attempt
/// held every start's NATS connection back by 100 ms.)
pub fn backoff(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = (attempts - 2).min(16) as u32;
    Duration::from_millis(
        RECONNECT_DELAY_MS_MIN.saturating_mul(1 << exp).min(RECONNECT_DELAY_MS_MAX),
    )
}

/// Starts a NATS client that keeps (re)connecting in the background and reports into
/// `readiness` as a degrading component: a lost link never makes a local-first service
/// unready. Fails only on an invalid URL.
pub async fn connect(
    url: &str,
    node_id: &str,
    readiness: &Readiness,
) -> anyhow::Result<async_nats::Client> {
    readiness.register(COMPONENT, Role::Degrading);
    let events = readiness.clone();
    let options = ConnectOptions::new()
        .name(node_id)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
        .reconnect_delay_callback(backoff)
        .event_callback(move |event| {
            let readiness = events.clone();
            async move {
                match event {
                    Event::Connected => {
                        tracing::info!("nats connected");
                        readiness.set(COMPONENT, ComponentState::Ok);
                    }
                    Event::Disconnected => {
                        tracing::warn!("nats disconnected");
                        readiness.set(COMPONENT, ComponentState::Down("disconnected"));
                    }
                    Event::Closed => readiness.set(COMPONENT, ComponentState::Down("closed")),
                    other => tracing::warn!(event = %other, "nats event"),
                }
            }
        });
    let client = options
        .connect(url)
        .await
        .map_err(|err| anyhow::anyhow!("cannot use NATS url {url}: {err}"))?;
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_millis(RECONNECT_DELAY_MS_MIN));
        assert_eq!(backoff(3), Duration::from_millis(2 * RECONNECT_DELAY_MS_MIN));
        assert_eq!(backoff(100), Duration::from_millis(RECONNECT_DELAY_MS_MAX));
    }
}
