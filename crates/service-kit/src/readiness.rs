//! The readiness registry: components report their state; some gate readiness, others
//! only degrade it (Keel's services are local-first, so a lost NATS link degrades them).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// How a component's state affects `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// While this component is not `ok`, the service answers 503 on `/readyz`.
    Gating,
    /// This component's state is reported, but the service stays ready without it.
    Degrading,
}

/// The state a component reports; rendered as a short snake_case string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ComponentState {
    /// Working.
    Ok,
    /// Not yet working (still starting, recovering, connecting).
    Pending,
    /// Was working, lost (e.g. `disconnected`); the string is the rendered state.
    Down(&'static str),
}

impl ComponentState {
    fn render(&self) -> &'static str {
        match self {
            ComponentState::Ok => "ok",
            ComponentState::Pending => "pending",
            ComponentState::Down(state) => state,
        }
    }
}

/// The most components one service may register (a limit, like every collection here).
pub const COMPONENTS_MAX: usize = 32;

#[derive(Debug)]
struct Entry {
    role: Role,
    state: ComponentState,
}

/// Shared, cheap-to-clone registry behind `/readyz`.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    inner: Arc<Mutex<BTreeMap<&'static str, Entry>>>,
}

/// The `/readyz` body: `{"ready": bool, "components": {"name": "state", ...}}`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReadinessReport {
    /// True when every gating component is `ok`.
    pub ready: bool,
    /// Every registered component and its state.
    pub components: BTreeMap<&'static str, &'static str>,
}

impl Readiness {
    /// An empty registry (ready, since nothing gates it).
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a component, starting `pending`.
    ///
    /// # Panics
    /// When more than [`COMPONENTS_MAX`] components are registered (a programming error).
    pub fn register(&self, name: &'static str, role: Role) {
        let mut map = self.inner.lock().expect("readiness lock");
        map.insert(name, Entry { role, state: ComponentState::Pending });
        assert!(map.len() <= COMPONENTS_MAX, "too many readiness components");
    }

    /// Reports a component's state; an unknown component is registered as gating.
    pub fn set(&self, name: &'static str, state: ComponentState) {
        let mut map = self.inner.lock().expect("readiness lock");
        map.entry(name)
            .or_insert(Entry { role: Role::Gating, state: ComponentState::Pending })
            .state = state;
    }

    /// The state of one component, if registered.
    pub fn state(&self, name: &str) -> Option<ComponentState> {
        self.inner.lock().expect("readiness lock").get(name).map(|e| e.state.clone())
    }

    /// The current report.
    pub fn report(&self) -> ReadinessReport {
        let map = self.inner.lock().expect("readiness lock");
        let ready =
            map.values().all(|e| e.role == Role::Degrading || e.state == ComponentState::Ok);
        let components = map.iter().map(|(name, e)| (*name, e.state.render())).collect();
        ReadinessReport { ready, components }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gating_components_decide_readiness_and_degrading_ones_do_not() {
        let r = Readiness::new();
        r.register("recovered", Role::Gating);
        r.register("nats", Role::Degrading);
        assert!(!r.report().ready);
        r.set("recovered", ComponentState::Ok);
        let report = r.report();
        assert!(report.ready);
        assert_eq!(report.components["nats"], "pending");
        r.set("nats", ComponentState::Down("disconnected"));
        let report = r.report();
        assert!(report.ready);
        assert_eq!(report.components["nats"], "disconnected");
        r.set("recovered", ComponentState::Down("recovering"));
        assert!(!r.report().ready);
    }
}
