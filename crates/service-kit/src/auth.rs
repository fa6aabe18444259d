//! Bearer-token authentication from a local token file: who is calling, in which roles.
//!
//! The file names one caller per line (blank lines and lines starting with `#` are skipped):
//!
//! ```text
//! # name      roles            sha256 of the token (64 hex digits)
//! alice       safety,operator  9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
//! panel-3     operator         2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae
//! ```
//!
//! It holds hashes only, never a token. A request names its caller with
//! `Authorization: Bearer <token>`. Nothing outside the process is asked, so authentication
//! keeps working whatever else on the floor is down (DESIGN §2.7: engaging must work even
//! when the identity provider is down).

use std::path::Path;

use axum::http::{HeaderMap, StatusCode, header::AUTHORIZATION};
use sha2::{Digest, Sha256};

use crate::ApiError;

/// Most callers a token file may name.
pub const TOKENS_MAX: usize = 1_024;
/// Largest token file read, in bytes.
pub const TOKEN_FILE_BYTES_MAX: u64 = 1024 * 1024;
/// Longest caller name, in bytes.
pub const NAME_BYTES_MAX: usize = 64;
/// Longest bearer token accepted, in bytes.
pub const TOKEN_BYTES_MAX: usize = 512;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The caller's name (what audits record).
    pub name: String,
    /// Its roles.
    pub roles: Vec<String>,
}

impl Identity {
    /// Whether the caller holds `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// The callers a service accepts, by the SHA-256 of their tokens.
#[derive(Debug, Clone)]
pub struct Tokens {
    callers: Vec<([u8; 32], Identity)>,
}

impl Tokens {
    /// Reads and parses a token file (see the module docs).
    pub fn load(path: &Path) -> Result<Tokens, String> {
        let shown = path.display();
        let size = std::fs::metadata(path).map_err(|e| format!("{shown}: {e}"))?.len();
        if size > TOKEN_FILE_BYTES_MAX {
            return Err(format!("{shown}: {size} bytes, more than {TOKEN_FILE_BYTES_MAX}"));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{shown}: {e}"))?;
        Tokens::parse(&text).map_err(|e| format!("{shown}: {e}"))
    }

    /// Parses the text of a token file.
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let mut callers: Vec<([u8; 32], Identity)> = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |what: &str| format!("line {}: {what}", number + 1);
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, roles, hash] = fields[..] else {
                return Err(at("expected `name roles sha256-hex`"));
            };
            if name.len() > NAME_BYTES_MAX {
                return Err(at(&format!("name longer than {NAME_BYTES_MAX} bytes")));
            }
            let roles: Vec<String> =
                roles.split(',').filter(|r| !r.is_empty()).map(str::to_owned).collect();
            if roles.is_empty() {
                return Err(at("no role"));
            }
            let hash = decode_hash(hash).ok_or_else(|| at("the hash is not 64 hex digits"))?;
            if callers.iter().any(|(h, _)| *h == hash) {
                return Err(at("the same token hash twice"));
            }
            if callers.len() == TOKENS_MAX {
                return Err(format!("more than {TOKENS_MAX} callers"));
            }
            callers.push((hash, Identity { name: name.to_owned(), roles }));
        }
        if callers.is_empty() {
            return Err("no caller".into());
        }
        Ok(Tokens { callers })
    }

    /// The caller a request's bearer token names: 401 `unauthenticated` without a valid one.
    pub fn identify(&self, headers: &HeaderMap) -> Result<&Identity, ApiError> {
        let unauthenticated =
            |why: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", why.to_owned());
        let value = headers
            .get(AUTHORIZATION)
            .ok_or_else(|| unauthenticated("an Authorization: Bearer token is required"))?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                // The scheme is case-insensitive (RFC 9110 §11.1).
                let scheme = v.get(..7)?;
                scheme.eq_ignore_ascii_case("bearer ").then(|| &v[7..])
            })
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= TOKEN_BYTES_MAX)
            .ok_or_else(|| unauthenticated("the Authorization header is not a bearer token"))?;
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Compare against every caller without stopping early.
        let mut found = None;
        for (candidate, identity) in &self.callers {
            let differs = candidate.iter().zip(&hash).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if differs == 0 {
                found = Some(identity);
            }
        }
        found.ok_or_else(|| unauthenticated("unknown token"))
    }

    /// As [`Tokens::identify`], and 403 `forbidden` unless the caller holds `role`.
    pub fn require(&self, headers: &HeaderMap, role: &str) -> Result<&Identity, ApiError> {
        let identity = self.identify(headers)?;
        if !identity.has_role(role) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("{} does not hold the {role} role", identity.name),
            ));
        }
        Ok(identity)
    }
}

fn decode_hash(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// The SHA-256 of `token` in hex, as a token file line wants it.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {token}")).unwrap());
        headers
    }

    fn tokens() -> Tokens {
        Tokens::parse(&format!(
            "# callers\n\nalice safety,operator {}\npanel-3 operator {}\n",
            hash_token("alice-secret"),
            hash_token("panel-secret")
        ))
        .unwrap()
    }

    #[test]
    fn callers_are_named_by_their_token_and_roles_are_checked() {
        let tokens = tokens();
        assert_eq!(tokens.identify(&bearer("alice-secret")).unwrap().name, "alice");
        let mut lower = HeaderMap::new();
        lower.insert(AUTHORIZATION, HeaderValue::from_static("bearer alice-secret"));
        assert_eq!(tokens.identify(&lower).unwrap().name, "alice");
        assert_eq!(tokens.require(&bearer("alice-secret"), "safety").unwrap().name, "alice");
        let panel = tokens.identify(&bearer("panel-secret")).unwrap();
        assert_eq!((panel.name.as_str(), panel.has_role("safety")), ("panel-3", false));
        let forbidden = tokens.require(&bearer("panel-secret"), "safety").unwrap_err();
        assert_eq!(forbidden.body()["error"], "forbidden");
        for headers in [HeaderMap::new(), bearer("wrong"), bearer("")] {
            let error = tokens.identify(&headers).unwrap_err();
            assert_eq!(error.body()["error"], "unauthenticated");
        }
        let mut basic = HeaderMap::new();
        basic.insert(AUTHORIZATION, HeaderValue::from_static("Basic YWxpY2U6eA=="));
        assert!(tokens.identify(&basic).is_err());
    }

    #[test]
    fn malformed_token_files_are_refused_with_the_line() {
        let hash = hash_token("t");
        for (text, expect) in [
            ("", "no caller"),
            ("alice safety", "line 1"),
            (&format!("alice  {hash}") as &str, "line 1"),
            ("alice safety abc", "line 1: the hash"),
            (&format!("a r {hash}\nb r {hash}"), "line 2: the same token hash"),
            (&format!("{} r {hash}", "n".repeat(NAME_BYTES_MAX + 1)), "line 1: name"),
        ] {
            let error = Tokens::parse(text).unwrap_err();
            assert!(error.contains(expect), "{text:?}: {error}");
        }
    }
}
