//! The ledger store on a thread of its own, and the plumbing between it and the
//! [`Books`](super::books::Books): a write handed over after each round, its outcome
//! applied to the books and the counters, the last write at shutdown, and the reads of
//! sealed minutes that statements need (serialized with the writes, on the same
//! connection). A slow or hung disk stalls the writer thread only, never the threads that
//! serve `/metrics` and scrape.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::books::{Commit, Finished, LedgerStore};
use super::metrics::OperationLabels;
use super::{Shared, REJECT_LOG_EVERY_MS};
use crate::clock;
use crate::ledger::{Gap, Totals, MINUTE_MS};

/// The store's thread: one job at a time, in order.
pub(super) struct Writer {
    jobs: std::sync::mpsc::Sender<Queued>,
    /// One read queued at a time: a crowd of statement requests waits here, not in the
    /// writer's queue, so a commit waits behind one read at most.
    reads: tokio::sync::Semaphore,
}

type Done = tokio::sync::oneshot::Sender<Result<(), String>>;

/// What a statement reads of a contract: its sealed minutes `(minute, totals)`, the late
/// GPU-ms `(minute, delivered, used)` that arrived for them, each in order, and its delivery
/// gaps (when asked for).
pub(super) struct Minutes {
    pub minutes: Vec<(i64, Totals)>,
    pub late: Vec<(i64, i64, i64)>,
    pub gaps: Vec<Gap>,
}

/// A job and when it was queued: the writer thread logs (at debug) how long each waited
/// behind the one before it and how long it took, so a read that holds up a commit shows.
struct Queued {
    job: WriteJob,
    at: Instant,
}

enum WriteJob {
    /// Sealed minutes, the ledger's snapshot and its pending gaps, in one transaction.
    /// Answered with whether the next commit should carry the hosts' states.
    Commit {
        commit: Commit,
        done: tokio::sync::oneshot::Sender<Result<bool, String>>,
    },
    /// At a clean stop: the host checkpoints not yet written (they are written only every
    /// `--storage.host-checkpoint-interval` while running).
    Flush { done: Done },
    /// A contract's sealed minutes `[from, to)` and, with `gaps_to`, its gaps overlapping
    /// `[from, gaps_to)` (minutes), for a statement.
    Read {
        contract: String,
        from: i64,
        to: i64,
        gaps_to: Option<i64>,
        done: tokio::sync::oneshot::Sender<Result<Minutes, String>>,
    },
}

impl Writer {
    pub(super) fn spawn<S: LedgerStore>(mut store: S, ids: Vec<String>) -> std::io::Result<Self> {
        let (jobs, queue) = std::sync::mpsc::channel::<Queued>();
        std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || {
                for Queued { job, at } in queue {
                    let started = clock::monotonic_now();
                    let waited_ms = started.saturating_duration_since(at).as_millis() as u64;
                    match job {
                        WriteJob::Commit { commit, done } => {
                            let r = store.commit(&ids, &commit);
                            let took_ms = clock::elapsed(started).as_millis() as u64;
                            let hosts = commit.snap.hosts.len();
                            tracing::debug!(minutes = commit.sealed.len(), hosts, waited_ms, took_ms, ok = r.is_ok(), "ledger commit");
                            drop(commit);
                            let _ = done.send(r.map(|()| store.hosts_due()).map_err(|e| e.to_string()));
                        }
                        WriteJob::Flush { done } => {
                            let _ = done.send(store.flush().map_err(|e| e.to_string()));
                        }
                        WriteJob::Read {
                            contract,
                            from,
                            to,
                            gaps_to,
                            done,
                        } => {
                            let r = store.minutes(&contract, from, to).and_then(|minutes| {
                                let late = store.late_minutes(&contract, from, to)?;
                                let gaps = match gaps_to {
                                    Some(gaps_to) => store.gaps(
                                        &contract,
                                        from.saturating_mul(MINUTE_MS),
                                        gaps_to.saturating_mul(MINUTE_MS),
                                    )?,
                                    None => Vec::new(),
                                };
                                Ok(Minutes {
                                    minutes,
                                    late,
                                    gaps,
                                })
                            });
                            let took_ms = clock::elapsed(started).as_millis() as u64;
                            let rows = r.as_ref().map_or(0, |m| m.minutes.len());
                            tracing::debug!(contract = %contract, rows, waited_ms, took_ms, "ledger read");
                            let _ = done.send(r.map_err(|e| e.to_string()));
                        }
                    }
                }
            })?;
        Ok(Self {
            jobs,
            reads: tokio::sync::Semaphore::new(1),
        })
    }

    /// Contract `contract`'s sealed minutes `[from, to)`, their late GPU-ms and, with
    /// `gaps_to`, its delivery gaps overlapping the minutes `[from, gaps_to)` (as `commitmeter
    /// statement` reads them: the gaps of the whole period, the minutes sealed), read by the
    /// writer thread between two writes: the caller awaits, no runtime thread waits for the
    /// disk.
    pub(super) async fn read(
        &self,
        contract: &str,
        from: i64,
        to: i64,
        gaps_to: Option<i64>,
    ) -> Result<Minutes, String> {
        let _turn = self
            .reads
            .acquire()
            .await
            .map_err(|_| WRITER_GONE.to_string())?;
        let (done, answer) = tokio::sync::oneshot::channel();
        self.send(WriteJob::Read {
            contract: contract.to_string(),
            from,
            to,
            gaps_to,
            done,
        })
        .map_err(|_| WRITER_GONE.to_string())?;
        answer.await.map_err(|_| WRITER_GONE.to_string())?
    }

    /// Queues `job` for the writer thread; `Err` once the thread is gone.
    fn send(&self, job: WriteJob) -> Result<(), ()> {
        self.jobs
            .send(Queued {
                job,
                at: clock::monotonic_now(),
            })
            .map_err(|_| ())
    }
}

/// How long shutdown waits for the last ledger write.
const FINAL_WRITE_WAIT: Duration = Duration::from_secs(10);

const WRITER_GONE: &str = "the ledger writer thread is gone";

impl Shared {
    /// Seals the minutes that are due into the pending ones (CPU only; see
    /// [`Books::seal_due`](super::books::Books::seal_due)).
    pub(super) fn seal_due(&self) {
        let now = self.clock.now_ms();
        let pending = self.books.lock().expect("books lock").seal_due(now);
        self.metrics.pending.set(pending as i64);
    }

    /// Hands the pending minutes and the ledger's snapshot to the writer thread, unless a
    /// write is still in flight (a slow disk: the next write carries everything). The
    /// store writes open minutes every round and host checkpoints when they are due.
    pub(super) fn start_write(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let commit = self
            .books
            .lock()
            .expect("books lock")
            .start_write(clock::monotonic_now())?;
        let n = commit.sealed.len();
        let (done, outcome) = tokio::sync::oneshot::channel();
        let sent = self.writer.send(WriteJob::Commit { commit, done });
        let me = self.clone();
        Some(self.runtime.spawn(async move {
            let written = match sent {
                Ok(()) => outcome
                    .await
                    .map_err(|_| WRITER_GONE.to_string())
                    .and_then(|r| r),
                Err(_) => Err(WRITER_GONE.to_string()),
            };
            me.finish_write(n, written);
        }))
    }

    /// Applies a finished write of `n` minutes: only now do its minutes reach the counters.
    fn finish_write(self: &Arc<Self>, n: usize, written: Result<bool, String>) {
        let mut books = self.books.lock().expect("books lock");
        if let Ok(hosts_due) = written {
            books.want_hosts(hosts_due);
        }
        let minutes = match (books.finish_write(written.is_ok()), written) {
            (Finished::Durable { minutes, recovered }, _) => {
                if recovered {
                    *self.write_failure_logged.lock().expect("write log lock") = None;
                    tracing::info!(
                        minutes = n,
                        "the ledger is written again; pending minutes are durable"
                    );
                }
                minutes
            }
            (Finished::Failed { .. }, written) => {
                drop(books);
                let e = written.err().unwrap_or_default();
                let mut logged = self.write_failure_logged.lock().expect("write log lock");
                let due = logged.is_none_or(|at: Instant| {
                    clock::elapsed(at) >= Duration::from_millis(REJECT_LOG_EVERY_MS as u64)
                });
                if due {
                    tracing::error!(error = %e, pending_minutes = n, "cannot write the ledger; sealed minutes kept in memory and retried every round");
                    *logged = Some(clock::monotonic_now());
                }
                self.metrics.write_ok.set(0);
                self.metrics
                    .store_errors
                    .with(&OperationLabels {
                        operation: "commit",
                    })
                    .inc();
                return;
            }
        };
        self.metrics.write_ok.set(1);
        drop(books);
        self.publish_durable();
        // The month-to-date gauges and the page move with the counters.
        self.refresh_gauges();
        if minutes > 0 {
            self.render_status();
            self.refresh_sizing();
        }
    }

    /// The counters from the books' durable minutes: the contract and team counters, how
    /// far the ledger is sealed, what waits. After a start, a durable write, and minutes
    /// taken back from a shared book: one function, so the three agree.
    pub(super) fn publish_durable(&self) {
        let books = self.books.lock().expect("books lock");
        for (c, contract) in self.contracts.iter().enumerate() {
            self.metrics.ledger.set(
                &contract.id,
                &books.running(c).all_time,
                books.durable_late(c),
            );
            let (allocated, teams) = books.team_all_time(c);
            self.metrics
                .teams
                .set_all_time(&contract.id, allocated, teams);
        }
        self.metrics
            .sealed_through
            .set(books.durable_through() * 60);
        if books.is_shared() {
            // The book's start, the same on every replica (not this process's own).
            let since = (0..self.contracts.len()).map(|c| books.since_of(c)).min();
            self.metrics.since.set(since.unwrap_or(books.since()) * 60);
        }
        self.metrics.pending.set(books.pending() as i64);
    }

    /// At shutdown: waits for a write in flight, then writes once more, so a clean stop
    /// leaves the freshest snapshot. A hung disk does not hold the process: after
    /// [`FINAL_WRITE_WAIT`] it stops anyway (open minutes are recovered from the agents'
    /// cumulative counters at the next start).
    pub(super) async fn final_write(self: &Arc<Self>) {
        let deadline = clock::monotonic_now() + FINAL_WRITE_WAIT;
        loop {
            let in_flight = self
                .books
                .lock()
                .expect("books lock")
                .write_in_flight_for(clock::monotonic_now());
            if in_flight.is_none() {
                break;
            }
            if clock::monotonic_now() >= deadline {
                tracing::warn!(
                    "a ledger write did not finish before shutdown; stopping without it"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.seal_due();
        // The last write carries every host's state: the flush below writes it.
        self.books.lock().expect("books lock").want_hosts(true);
        if let Some(job) = self.start_write() {
            let left = deadline.saturating_duration_since(clock::monotonic_now());
            if tokio::time::timeout(left, job).await.is_err() {
                tracing::warn!(
                    "the last ledger write did not finish before shutdown; stopping without it"
                );
                return;
            }
        }
        // A shared book gets the minutes closed so far (a replica may have sent them too:
        // the book keeps the first).
        if self.book.is_some() {
            let left = deadline.saturating_duration_since(clock::monotonic_now());
            if tokio::time::timeout(left, self.last_book_round())
                .await
                .is_err()
            {
                tracing::warn!("the shared book did not answer before shutdown; closed minutes not sent are the other replica's to send");
            }
        }
        // Every host's checkpoint, so a restart resumes every host from its counters.
        let (done, flushed) = tokio::sync::oneshot::channel();
        if self.writer.send(WriteJob::Flush { done }).is_err() {
            return;
        }
        let left = deadline.saturating_duration_since(clock::monotonic_now());
        match tokio::time::timeout(left, flushed).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "cannot write host checkpoints at stop; the next start re-baselines every host"),
            _ => tracing::warn!("host checkpoints not written before shutdown; the next start re-baselines every host"),
        }
    }
}
