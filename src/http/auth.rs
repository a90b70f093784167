//! HTTP basic auth against bcrypt hashes (`basic_auth_users` of the web config).
//!
//! bcrypt at cost 10 takes 50–100 ms of CPU, so a scraper every 15 s would cost more than
//! the agent itself: successful checks are remembered, as exporter-toolkit does, keyed by
//! a salted SHA-256 of user and password (the password itself is never kept). Misses run
//! on the blocking pool, one at a time, so wrong passwords can neither stall the server's
//! single-threaded runtime nor take every core.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use base64::Engine;
use hyper::header::HeaderValue;
use tokio::sync::Semaphore;

/// How many successful (user, password) pairs are remembered; the oldest goes first.
pub const CACHE_SIZE: usize = 64;

/// Users and their bcrypt hashes, already checked to parse.
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    /// Hashed against when the user is unknown, so the answer takes as long as for a
    /// known user with a wrong password.
    decoy: String,
    /// Random per process, so a cache key reveals nothing outside it.
    salt: [u8; 32],
    cache: Mutex<VecDeque<[u8; 32]>>,
    bcrypt_slots: Arc<Semaphore>,
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicAuth")
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl BasicAuth {
    /// `users` is not empty and every hash is a valid bcrypt hash (see the web config).
    pub fn new(users: BTreeMap<String, String>) -> Self {
        let decoy = users.values().next().cloned().unwrap_or_default();
        let mut salt = [0u8; 32];
        // No randomness (never seen on Linux) only makes the keys predictable, not wrong.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt);
        Self {
            users,
            decoy,
            salt,
            cache: Mutex::new(VecDeque::with_capacity(CACHE_SIZE)),
            bcrypt_slots: Arc::new(Semaphore::new(1)),
        }
    }

    /// Whether an `Authorization` header carries a known user and that user's password.
    pub async fn check(self: &Arc<Self>, header: Option<&HeaderValue>) -> bool {
        let Some((user, password)) = header.and_then(parse_basic) else {
            return false;
        };
        let key = self.key(&user, &password);
        if self.cached(&key) {
            return true;
        }
        let Ok(_slot) = self.bcrypt_slots.clone().acquire_owned().await else {
            return false;
        };
        let me = self.clone();
        let ok = tokio::task::spawn_blocking(move || me.verify(&user, &password))
            .await
            .unwrap_or(false);
        if ok {
            self.remember(key);
        }
        ok
    }

    fn remember(&self, key: [u8; 32]) {
        let mut cache = self.cache.lock().expect("auth cache lock");
        if !cache.contains(&key) {
            if cache.len() >= CACHE_SIZE {
                cache.pop_front();
            }
            cache.push_back(key);
        }
    }

    /// The bcrypt comparison itself, with no cache.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            None => {
                let _ = bcrypt::verify(password, &self.decoy);
                false
            }
        }
    }

    fn key(&self, user: &str, password: &[u8]) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&self.salt);
        ctx.update(&(user.len() as u64).to_le_bytes());
        ctx.update(user.as_bytes());
        ctx.update(password);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    fn cached(&self, key: &[u8; 32]) -> bool {
        self.cache.lock().expect("auth cache lock").contains(key)
    }

    /// Entries in the cache (for tests).
    pub fn cache_len(&self) -> usize {
        self.cache.lock().expect("auth cache lock").len()
    }
}

/// `Basic base64(user:password)` → (user, password); the scheme is case-insensitive.
fn parse_basic(header: &HeaderValue) -> Option<(String, Vec<u8>)> {
    let value = header.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    Some((user, decoded[colon + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(user: &str, password: &str) -> HeaderValue {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        HeaderValue::from_str(&format!("Basic {token}")).unwrap()
    }

    fn auth() -> Arc<BasicAuth> {
        let mut users = BTreeMap::new();
        users.insert("alice".to_string(), bcrypt::hash("s3cret", 4).unwrap());
        users.insert("bob".to_string(), bcrypt::hash("hunter2", 4).unwrap());
        Arc::new(BasicAuth::new(users))
    }

    #[tokio::test]
    async fn right_password_passes_and_is_cached() {
        let a = auth();
        assert!(a.check(Some(&header("alice", "s3cret"))).await);
        assert_eq!(a.cache_len(), 1);
        // A second check is a cache hit: nothing new is added.
        assert!(a.check(Some(&header("alice", "s3cret"))).await);
        assert_eq!(a.cache_len(), 1);
        assert!(a.check(Some(&header("bob", "hunter2"))).await);
        assert_eq!(a.cache_len(), 2);
    }

    #[tokio::test]
    async fn wrong_or_missing_credentials_fail_and_are_not_cached() {
        let a = auth();
        assert!(!a.check(None).await);
        assert!(!a.check(Some(&header("alice", "S3cret"))).await);
        // Bob's password is not Alice's, nor is Alice's cached success Bob's.
        assert!(a.check(Some(&header("alice", "s3cret"))).await);
        assert!(!a.check(Some(&header("bob", "s3cret"))).await);
        assert!(!a.check(Some(&header("mallory", "s3cret"))).await);
        assert!(!a.check(Some(&HeaderValue::from_static("Bearer abc"))).await);
        assert!(!a.check(Some(&HeaderValue::from_static("Basic !!!"))).await);
        assert!(
            !a.check(Some(&HeaderValue::from_static("Basic YWxpY2U=")))
                .await
        ); // "alice", no colon
        assert_eq!(a.cache_len(), 1);
    }

    #[test]
    fn header_parsing() {
        assert_eq!(
            parse_basic(&header("a", "b:c")),
            Some(("a".to_string(), b"b:c".to_vec()))
        );
        let lower = HeaderValue::from_static("basic YTpi");
        assert_eq!(parse_basic(&lower), Some(("a".to_string(), b"b".to_vec())));
    }

    #[tokio::test]
    async fn the_cache_is_bounded() {
        let a = auth();
        // Distinct passwords cannot all be right; fill the cache directly.
        for i in 0..CACHE_SIZE + 5 {
            a.remember(a.key("alice", format!("p{i}").as_bytes()));
        }
        assert_eq!(a.cache_len(), CACHE_SIZE);
        assert!(a.check(Some(&header("alice", "s3cret"))).await);
        assert_eq!(a.cache_len(), CACHE_SIZE);
        assert!(a.cached(&a.key("alice", b"s3cret")));
        assert!(!a.cached(&a.key("alice", b"p0")));
    }
}
