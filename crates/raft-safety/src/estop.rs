//! The e-stop register: the state machine safety-quorum replicates (engage, clear, audit).
//!
//! Engaging is idempotent by `request_id`: a retried request returns the response of its first
//! application and changes nothing. The register is cleared only by a committed `Clear` command;
//! nothing else (no trip, no timeout) clears it. Every applied command is recorded in a bounded
//! audit list with who, why and when.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::state_machine::{StateMachine, StateMachineError};

/// Audit records kept; the oldest is dropped beyond this.
pub const AUDIT_RECORDS_MAX: usize = 1_024;
/// Request ids remembered for idempotency; the oldest is forgotten beyond this.
pub const DEDUP_REQUEST_IDS_MAX: usize = 4_096;
/// Longest accepted text field (reason, source, who, request id).
pub const TEXT_FIELD_BYTES_MAX: usize = 1_024;

/// A command proposed to the e-stop register. `at_ms` is the proposer's clock (Unix ms), carried
/// in the command so that applying stays deterministic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum EStopCommand {
    /// Engage the e-stop (open to every authenticated caller).
    Engage {
        /// Idempotency key chosen by the caller.
        request_id: String,
        /// Why.
        reason: String,
        /// Where the request came from (device, panel, service).
        source: String,
        /// Who asked (may be empty when the identity provider is down).
        #[serde(default)]
        who: String,
        /// When the proposer received the request (Unix ms).
        at_ms: u64,
    },
    /// Clear the e-stop (needs the safety role, checked before proposing).
    Clear {
        /// Idempotency key chosen by the caller.
        request_id: String,
        /// Who cleared it.
        by: String,
        /// Why.
        #[serde(default)]
        reason: String,
        /// When the proposer received the request (Unix ms).
        at_ms: u64,
    },
}

impl EStopCommand {
    /// Encodes the command for [`crate::RaftHandle::propose`] / [`crate::Node::propose`].
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("e-stop command serialises")
    }

    fn request_id(&self) -> &str {
        match self {
            EStopCommand::Engage { request_id, .. } | EStopCommand::Clear { request_id, .. } => {
                request_id
            }
        }
    }
}

/// What the register holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EStopState {
    /// Whether the e-stop is engaged.
    pub engaged: bool,
    /// Reason of the engagement in force (or of the last clear).
    pub reason: String,
    /// Source of the engagement in force (empty after a clear).
    pub source: String,
    /// Who made the last change.
    pub who: String,
    /// When the last change was requested (Unix ms, proposer's clock).
    pub at_ms: u64,
    /// Request id of the last change.
    pub request_id: String,
    /// Term of the entry that made the last change.
    pub term: u64,
    /// Log index of the entry that made the last change.
    pub index: u64,
}

/// Which command an audit record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EStopAction {
    /// An engage command.
    Engage,
    /// A clear command.
    Clear,
}

/// One applied command, as recorded in the audit list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Log index of the command.
    pub index: u64,
    /// Term of the command.
    pub term: u64,
    /// Engage or clear.
    pub action: EStopAction,
    /// The request id.
    pub request_id: String,
    /// Who (engage: `who`, clear: `by`).
    pub who: String,
    /// Why.
    pub reason: String,
    /// Source (engage only).
    pub source: String,
    /// When requested (Unix ms).
    pub at_ms: u64,
    /// Whether the register changed (engaging an engaged register does not).
    pub changed: bool,
}

/// The answer to an applied command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EStopResponse {
    /// Whether the e-stop is engaged after the command.
    pub engaged: bool,
    /// Whether this command changed the register.
    pub changed: bool,
    /// Whether this request id had already been applied (the original answer is repeated).
    pub duplicate: bool,
    /// Term of the entry that first applied this request id.
    pub term: u64,
    /// Log index of the entry that first applied this request id.
    pub index: u64,
    /// Set when the command was rejected (malformed); nothing changed then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl EStopResponse {
    /// Decodes a response returned by a proposal.
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// A read-only query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EStopQuery {
    /// The register ([`EStopState`]).
    State,
    /// The audit list (`Vec<AuditRecord>`, oldest first).
    Audit,
}

impl EStopQuery {
    /// Encodes the query for [`crate::RaftHandle::read`].
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("e-stop query serialises")
    }
}

/// The e-stop register state machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EStop {
    state: EStopState,
    audit: VecDeque<AuditRecord>,
    responses: HashMap<String, EStopResponse>,
    response_order: VecDeque<String>,
}

impl EStop {
    /// An empty, clear register.
    pub fn new() -> Self {
        Self::default()
    }

    /// The register.
    pub fn state(&self) -> &EStopState {
        &self.state
    }

    /// The audit list, oldest first (at most [`AUDIT_RECORDS_MAX`]).
    pub fn audit(&self) -> impl Iterator<Item = &AuditRecord> {
        self.audit.iter()
    }

    /// Decodes the answer to [`EStopQuery::State`].
    pub fn decode_state(bytes: &[u8]) -> Result<EStopState, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    fn apply_command(&mut self, index: u64, term: u64, command: EStopCommand) -> EStopResponse {
        if let Some(previous) = self.responses.get(command.request_id()) {
            let mut response = previous.clone();
            response.duplicate = true;
            response.changed = false;
            response.engaged = self.state.engaged;
            return response;
        }
        let record = match command {
            EStopCommand::Engage { request_id, reason, source, who, at_ms } => {
                let changed = !self.state.engaged;
                if changed {
                    self.state = EStopState {
                        engaged: true,
                        reason: reason.clone(),
                        source: source.clone(),
                        who: who.clone(),
                        at_ms,
                        request_id: request_id.clone(),
                        term,
                        index,
                    };
                }
                AuditRecord {
                    index,
                    term,
                    action: EStopAction::Engage,
                    request_id,
                    who,
                    reason,
                    source,
                    at_ms,
                    changed,
                }
            }
            EStopCommand::Clear { request_id, by, reason, at_ms } => {
                let changed = self.state.engaged;
                if changed {
                    self.state = EStopState {
                        engaged: false,
                        reason: reason.clone(),
                        source: String::new(),
                        who: by.clone(),
                        at_ms,
                        request_id: request_id.clone(),
                        term,
                        index,
                    };
                }
                AuditRecord {
                    index,
                    term,
                    action: EStopAction::Clear,
                    request_id,
                    who: by,
                    reason,
                    source: String::new(),
                    at_ms,
                    changed,
                }
            }
        };
        let response = EStopResponse {
            engaged: self.state.engaged,
            changed: record.changed,
            duplicate: false,
            term,
            index,
            error: None,
        };
        self.remember(record.request_id.clone(), response.clone());
        if self.audit.len() == AUDIT_RECORDS_MAX {
            self.audit.pop_front();
        }
        self.audit.push_back(record);
        response
    }

    fn remember(&mut self, request_id: String, response: EStopResponse) {
        if self.response_order.len() == DEDUP_REQUEST_IDS_MAX
            && let Some(oldest) = self.response_order.pop_front()
        {
            self.responses.remove(&oldest);
        }
        self.response_order.push_back(request_id.clone());
        self.responses.insert(request_id, response);
    }

    fn rejected(&self, index: u64, term: u64, error: String) -> EStopResponse {
        EStopResponse {
            engaged: self.state.engaged,
            changed: false,
            duplicate: false,
            term,
            index,
            error: Some(error),
        }
    }
}

fn validate(command: &EStopCommand) -> Result<(), String> {
    let fields: Vec<(&str, &str)> = match command {
        EStopCommand::Engage { request_id, reason, source, who, .. } => {
            vec![("request_id", request_id), ("reason", reason), ("source", source), ("who", who)]
        }
        EStopCommand::Clear { request_id, by, reason, .. } => {
            vec![("request_id", request_id), ("by", by), ("reason", reason)]
        }
    };
    for (name, value) in fields {
        if value.len() > TEXT_FIELD_BYTES_MAX {
            return Err(format!("{name} longer than {TEXT_FIELD_BYTES_MAX} bytes"));
        }
    }
    if command.request_id().is_empty() {
        return Err("request_id is empty".to_owned());
    }
    if let EStopCommand::Clear { by, .. } = command
        && by.is_empty()
    {
        return Err("clear needs `by`".to_owned());
    }
    Ok(())
}

impl StateMachine for EStop {
    fn apply(&mut self, index: u64, term: u64, command: &[u8]) -> Vec<u8> {
        let response = match serde_json::from_slice::<EStopCommand>(command) {
            Ok(command) => match validate(&command) {
                Ok(()) => self.apply_command(index, term, command),
                Err(error) => self.rejected(index, term, error),
            },
            Err(error) => self.rejected(index, term, format!("malformed command: {error}")),
        };
        serde_json::to_vec(&response).expect("e-stop response serialises")
    }

    fn query(&self, query: &[u8]) -> Vec<u8> {
        let result = match serde_json::from_slice::<EStopQuery>(query) {
            Ok(EStopQuery::Audit) => serde_json::to_vec(&self.audit),
            // Unknown queries answer with the register, the only thing most callers want.
            Ok(EStopQuery::State) | Err(_) => serde_json::to_vec(&self.state),
        };
        result.expect("e-stop state serialises")
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("e-stop snapshot serialises")
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), StateMachineError> {
        *self = serde_json::from_slice(snapshot)
            .map_err(|error| StateMachineError::Decode(error.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engage(id: &str) -> Vec<u8> {
        EStopCommand::Engage {
            request_id: id.into(),
            reason: "person in cell".into(),
            source: "panel-3".into(),
            who: "alice".into(),
            at_ms: 7,
        }
        .encode()
    }

    fn clear(id: &str) -> Vec<u8> {
        EStopCommand::Clear {
            request_id: id.into(),
            by: "bob".into(),
            reason: "cell checked".into(),
            at_ms: 9,
        }
        .encode()
    }

    fn apply(sm: &mut EStop, index: u64, command: &[u8]) -> EStopResponse {
        EStopResponse::decode(&sm.apply(index, 2, command)).unwrap()
    }

    #[test]
    fn engage_is_idempotent_by_request_id() {
        let mut sm = EStop::new();
        let first = apply(&mut sm, 1, &engage("r1"));
        assert!(first.engaged && first.changed && !first.duplicate);
        assert_eq!((first.term, first.index), (2, 1));
        let again = apply(&mut sm, 2, &engage("r1"));
        assert!(again.duplicate && !again.changed);
        assert_eq!(again.index, 1, "a retry answers with the original position");
        assert_eq!(sm.audit().count(), 1, "a duplicate is not a new change");
        let state = sm.state();
        assert_eq!(
            (state.engaged, state.reason.as_str(), state.source.as_str()),
            (true, "person in cell", "panel-3")
        );
        assert_eq!((state.who.as_str(), state.at_ms, state.index), ("alice", 7, 1));
    }

    #[test]
    fn only_a_committed_clear_clears_and_everything_is_audited() {
        let mut sm = EStop::new();
        apply(&mut sm, 1, &engage("r1"));
        let second = apply(&mut sm, 2, &engage("r2"));
        assert!(second.engaged && !second.changed, "engaged stays engaged");
        assert_eq!(sm.state().request_id, "r1", "the first engagement stays in force");
        let cleared = apply(&mut sm, 3, &clear("c1"));
        assert!(!cleared.engaged && cleared.changed);
        assert_eq!(sm.state().who, "bob");
        let audit: Vec<_> = sm.audit().map(|r| (r.action, r.changed)).collect();
        assert_eq!(
            audit,
            vec![
                (EStopAction::Engage, true),
                (EStopAction::Engage, false),
                (EStopAction::Clear, true)
            ]
        );
        // A retried clear does not clear a later engagement.
        apply(&mut sm, 4, &engage("r3"));
        let retry = apply(&mut sm, 5, &clear("c1"));
        assert!(retry.duplicate && retry.engaged);
        assert!(sm.state().engaged);
    }

    #[test]
    fn malformed_commands_are_rejected_without_effect() {
        let mut sm = EStop::new();
        for bad in [
            b"not json".to_vec(),
            br#"{"op":"engage","request_id":"x"}"#.to_vec(),
            br#"{"op":"engage","request_id":"","reason":"","source":"","at_ms":1}"#.to_vec(),
            br#"{"op":"clear","request_id":"c","by":"","at_ms":1}"#.to_vec(),
            br#"{"op":"engage","request_id":"x","reason":"","source":"","at_ms":1,"extra":1}"#
                .to_vec(),
        ] {
            let response = apply(&mut sm, 1, &bad);
            assert!(response.error.is_some(), "{}", String::from_utf8_lossy(&bad));
        }
        assert_eq!(sm, EStop::new());
    }

    #[test]
    fn audit_and_dedup_are_bounded() {
        let mut sm = EStop::new();
        let total = DEDUP_REQUEST_IDS_MAX + 10;
        for i in 0..total {
            let command =
                if i % 2 == 0 { engage(&format!("e{i}")) } else { clear(&format!("c{i}")) };
            apply(&mut sm, i as u64 + 1, &command);
        }
        assert_eq!(sm.audit().count(), AUDIT_RECORDS_MAX);
        assert_eq!(sm.responses.len(), DEDUP_REQUEST_IDS_MAX);
        assert_eq!(sm.audit().last().unwrap().index, total as u64);
    }

    #[test]
    fn snapshot_restores_everything_and_queries_answer() {
        let mut sm = EStop::new();
        apply(&mut sm, 1, &engage("r1"));
        let mut copy = EStop::new();
        copy.restore(&sm.snapshot()).unwrap();
        assert_eq!(copy, sm);
        assert!(apply(&mut copy, 2, &engage("r1")).duplicate);
        let state = EStop::decode_state(&sm.query(&EStopQuery::State.encode())).unwrap();
        assert!(state.engaged);
        let audit: Vec<AuditRecord> =
            serde_json::from_slice(&sm.query(&EStopQuery::Audit.encode())).unwrap();
        assert_eq!(audit.len(), 1);
        assert!(copy.restore(b"garbage").is_err());
    }
}
