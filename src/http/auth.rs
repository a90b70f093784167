//! HTTP basic auth against bcrypt hashes (`basic_auth_users` of the web config).
//!
//! bcrypt at cost 10 takes 50–100 ms of CPU, so a scraper every 15 s would cost more than
//! the agent itself: successful checks are remembered, as exporter-toolkit does, keyed by
//! a salted SHA-256 of user and password (the password itself is never kept).
//!
//! Misses are hashed on one dedicated thread, never on the runtime's, behind a queue of
//! [`QUEUE`]: a check that finds it full is answered at once ([`Verdict::Busy`], 429), so
//! wrong passwords can neither stall the server nor take every core, and a correct login
//! waits for at most [`QUEUE`] hashes, never for a crowd. The thread is not the runtime's:
//! a hash in progress does not hold up shutdown (the process exits under it).

use std::collections::{BTreeMap, VecDeque};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};

use base64::Engine;
use hyper::header::HeaderValue;

/// How many successful (user, password) pairs are remembered; the oldest goes first.
pub const CACHE_SIZE: usize = 64;

/// Checks waiting for the bcrypt thread, besides the one it is hashing.
pub const QUEUE: usize = 4;

/// The outcome of [`BasicAuth::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied,
    /// Not checked: the queue was full.
    Busy,
}

/// One bcrypt comparison for the thread.
struct Job {
    hash: Arc<str>,
    password: Vec<u8>,
    /// Whether a match means anything (an unknown user is hashed against the decoy).
    known: bool,
    reply: tokio::sync::oneshot::Sender<bool>,
}

/// Users and their bcrypt hashes, already checked to parse.
pub struct BasicAuth {
    users: BTreeMap<String, Arc<str>>,
    /// Hashed against when the user is unknown, so the answer takes as long as for a
    /// known user with a wrong password.
    decoy: Arc<str>,
    /// Random per process, so a cache key reveals nothing outside it.
    salt: [u8; 32],
    cache: Mutex<VecDeque<[u8; 32]>>,
    /// The bcrypt thread's queue, started on the first miss (`check-config` starts none).
    jobs: OnceLock<Option<SyncSender<Job>>>,
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
        let users: BTreeMap<String, Arc<str>> =
            users.into_iter().map(|(u, h)| (u, Arc::from(h))).collect();
        let decoy = users
            .values()
            .next()
            .cloned()
            .unwrap_or_else(|| Arc::from(""));
        let mut salt = [0u8; 32];
        // No randomness (never seen on Linux) only makes the keys predictable, not wrong.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt);
        Self {
            users,
            decoy,
            salt,
            cache: Mutex::new(VecDeque::with_capacity(CACHE_SIZE)),
            jobs: OnceLock::new(),
        }
    }

    /// Whether an `Authorization` header carries a known user and that user's password.
    pub async fn check(&self, header: Option<&HeaderValue>) -> Verdict {
        let Some((user, password)) = header.and_then(parse_basic) else {
            return Verdict::Denied;
        };
        let key = self.key(&user, &password);
        if self.cached(&key) {
            return Verdict::Allowed;
        }
        let Some(jobs) = self.jobs.get_or_init(start_bcrypt_thread) else {
            return Verdict::Denied;
        };
        let (hash, known) = match self.users.get(&user) {
            Some(h) => (h.clone(), true),
            None => (self.decoy.clone(), false),
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job {
            hash,
            password,
            known,
            reply,
        };
        match jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Verdict::Busy,
            Err(TrySendError::Disconnected(_)) => return Verdict::Denied,
        }
        if answer.await.unwrap_or(false) {
            self.remember(key);
            Verdict::Allowed
        } else {
            Verdict::Denied
        }
    }

    fn remember(&self, key: [u8; 32]) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if !cache.contains(&key) {
            if cache.len() >= CACHE_SIZE {
                cache.pop_front();
            }
            cache.push_back(key);
        }
    }

    /// The bcrypt comparison itself, with no cache and no queue.
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
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(key)
    }

    /// Entries in the cache (for tests).
    pub fn cache_len(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The bcrypt thread: one, so wrong passwords take at most one core. It ends when the
/// [`BasicAuth`] holding its queue is dropped; a hash in progress at exit is abandoned.
fn start_bcrypt_thread() -> Option<SyncSender<Job>> {
    let (tx, rx) = sync_channel::<Job>(QUEUE);
    let spawned = std::thread::Builder::new()
        .name("bcrypt".into())
        .spawn(move || {
            for job in rx {
                // The client left (timed out, hung up, shutdown): nobody needs the answer.
                if job.reply.is_closed() {
                    continue;
                }
                let matched = bcrypt::verify(&job.password, &job.hash).unwrap_or(false);
                let _ = job.reply.send(matched && job.known);
            }
        });
    match spawned {
        Ok(_) => Some(tx),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the bcrypt thread; every login is refused");
            None
        }
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

    impl BasicAuth {
        async fn ok(&self, header: Option<&HeaderValue>) -> bool {
            self.check(header).await == Verdict::Allowed
        }
    }

    #[tokio::test]
    async fn right_password_passes_and_is_cached() {
        let a = auth();
        assert!(a.ok(Some(&header("alice", "s3cret"))).await);
        assert_eq!(a.cache_len(), 1);
        // A second check is a cache hit: nothing new is added.
        assert!(a.ok(Some(&header("alice", "s3cret"))).await);
        assert_eq!(a.cache_len(), 1);
        assert!(a.ok(Some(&header("bob", "hunter2"))).await);
        assert_eq!(a.cache_len(), 2);
    }

    #[tokio::test]
    async fn wrong_or_missing_credentials_fail_and_are_not_cached() {
        let a = auth();
        assert!(!a.ok(None).await);
        assert!(!a.ok(Some(&header("alice", "S3cret"))).await);
        // Bob's password is not Alice's, nor is Alice's cached success Bob's.
        assert!(a.ok(Some(&header("alice", "s3cret"))).await);
        assert!(!a.ok(Some(&header("bob", "s3cret"))).await);
        assert!(!a.ok(Some(&header("mallory", "s3cret"))).await);
        assert!(!a.ok(Some(&HeaderValue::from_static("Bearer abc"))).await);
        assert!(!a.ok(Some(&HeaderValue::from_static("Basic !!!"))).await);
        assert!(
            !a.ok(Some(&HeaderValue::from_static("Basic YWxpY2U=")))
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
    async fn a_full_queue_answers_busy_at_once_and_the_cache_still_passes() {
        // A slow user: cost 12 (a second in a debug build, 0.2 s in release) keeps the
        // thread on the first check while the others queue up behind it.
        let mut users = BTreeMap::new();
        let slow = bcrypt::hash("x", 4).unwrap().replacen("$04$", "$12$", 1);
        users.insert("slow".to_string(), slow);
        users.insert("alice".to_string(), bcrypt::hash("s3cret", 4).unwrap());
        let a = Arc::new(BasicAuth::new(users));
        assert!(a.ok(Some(&header("alice", "s3cret"))).await);
        let checks: Vec<_> = (0..QUEUE + 3)
            .map(|_| {
                let a = a.clone();
                tokio::spawn(async move { a.check(Some(&header("slow", "wrong"))).await })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // Remembered logins do not wait behind the queue.
        assert!(a.ok(Some(&header("alice", "s3cret"))).await);
        // At most one hashing and QUEUE waiting: the others are already answered, Busy.
        let mut busy = 0;
        for c in checks {
            if c.is_finished() {
                assert_eq!(c.await.unwrap(), Verdict::Busy);
                busy += 1;
            } else {
                c.abort();
            }
        }
        assert!(busy >= 2, "{busy} answered at once");
    }

    #[tokio::test]
    async fn the_cache_is_bounded() {
        let a = auth();
        // Distinct passwords cannot all be right; fill the cache directly.
        for i in 0..CACHE_SIZE + 5 {
            a.remember(a.key("alice", format!("p{i}").as_bytes()));
        }
        assert_eq!(a.cache_len(), CACHE_SIZE);
        assert!(a.ok(Some(&header("alice", "s3cret"))).await);
        assert_eq!(a.cache_len(), CACHE_SIZE);
        assert!(a.cached(&a.key("alice", b"s3cret")));
        assert!(!a.cached(&a.key("alice", b"p0")));
    }
}
