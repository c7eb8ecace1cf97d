//! A warm instance pool: long-lived handler processes handed to one task at a time.
//!
//! Size stays within `[min, max]`: it grows on demand while tasks wait (a checkout spawns when
//! nothing is idle), shrinks toward `min` when instances sit idle, replaces instances that died or
//! hit their recycle limits, and drains on shutdown. `max` is also the pool's concurrency.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde::Serialize;
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

/// One warm process.
pub trait Instance: Send + 'static {
    /// False once the process exited or its pipes broke.
    fn is_alive(&mut self) -> bool;
    /// Whether it should be replaced instead of reused (turn count, memory...).
    fn needs_recycle(&mut self) -> bool;
    /// Aggregate whose conversation it holds, for session affinity.
    fn affinity(&self) -> Option<&str> {
        None
    }
    /// Readies an instance started ahead of demand, before it takes its first task. An error
    /// replaces it.
    fn warm_up(&mut self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    /// Stops the process (gracefully if it can, then by force).
    fn stop(self) -> BoxFuture<'static, ()>;
}

pub type Spawner<I> = Arc<dyn Fn() -> BoxFuture<'static, Result<I, String>> + Send + Sync>;

#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct PoolStats {
    pub size: usize,
    pub busy: usize,
    pub idle: usize,
    pub min: usize,
    pub max: usize,
    pub spawned: u64,
    /// Instances started ahead of demand that finished [`Instance::warm_up`].
    pub warmed_up: u64,
    pub recycled: u64,
    pub failures: u64,
}

struct Idle<I> {
    instance: I,
    since: Instant,
}

struct Inner<I> {
    spawner: Spawner<I>,
    min: usize,
    max: usize,
    idle_timeout: Duration,
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Idle<I>>>,
    size: AtomicUsize,
    busy: AtomicUsize,
    spawned: AtomicU64,
    warmed_up: AtomicU64,
    recycled: AtomicU64,
    failures: AtomicU64,
    closed: AtomicBool,
}

pub struct Pool<I: Instance> {
    inner: Arc<Inner<I>>,
}

impl<I: Instance> Clone for Pool<I> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

/// An instance checked out for one task. Return it with [`Pool::checkin`].
pub struct Lease<I> {
    pub instance: I,
    /// Whether it came from the idle list (warm) or was just spawned.
    pub reused: bool,
    _permit: OwnedSemaphorePermit,
}

impl<I: Instance> Pool<I> {
    pub fn new(min: usize, max: usize, idle_timeout: Duration, spawner: Spawner<I>) -> Self {
        let max = max.max(1);
        let pool = Self {
            inner: Arc::new(Inner {
                spawner,
                min: min.min(max),
                max,
                idle_timeout,
                permits: Arc::new(Semaphore::new(max)),
                idle: Mutex::new(Vec::new()),
                size: AtomicUsize::new(0),
                busy: AtomicUsize::new(0),
                spawned: AtomicU64::new(0),
                warmed_up: AtomicU64::new(0),
                recycled: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                closed: AtomicBool::new(false),
            }),
        };
        let reaper = pool.clone();
        tokio::spawn(async move { reaper.reap_idle().await });
        pool
    }

    /// Starts `min` instances ahead of the first task and warms them up side by side.
    pub async fn prewarm(&self) {
        let starts = (0..self.inner.min).map(|_| self.spawn_warm());
        let started = futures::future::join_all(starts).await;
        self.park(started.into_iter().flatten()).await;
    }

    /// Puts instances on the idle list, idle from now.
    async fn park(&self, instances: impl IntoIterator<Item = I>) {
        let since = Instant::now();
        self.inner.idle.lock().await.extend(
            instances
                .into_iter()
                .map(|instance| Idle { instance, since }),
        );
    }

    /// An instance started ahead of demand: no task waits for it, so it warms up first.
    async fn spawn_warm(&self) -> Option<I> {
        let mut instance = self.spawn().await?;
        let started = Instant::now();
        match instance.warm_up().await {
            Ok(()) => {
                self.inner.warmed_up.fetch_add(1, Ordering::SeqCst);
                debug!(took = ?started.elapsed(), "pool instance warmed up");
                Some(instance)
            }
            Err(e) => {
                warn!(error = %e, "pool instance failed its warm-up; replacing it");
                self.discard(instance, false).await;
                None
            }
        }
    }

    async fn spawn(&self) -> Option<I> {
        match (self.inner.spawner)().await {
            Ok(instance) => {
                self.inner.size.fetch_add(1, Ordering::SeqCst);
                self.inner.spawned.fetch_add(1, Ordering::SeqCst);
                Some(instance)
            }
            Err(e) => {
                self.inner.failures.fetch_add(1, Ordering::SeqCst);
                warn!(error = %e, "cannot start pool instance");
                None
            }
        }
    }

    /// Waits for a free slot, then hands out an idle instance (preferring one that holds
    /// `affinity`'s conversation) or starts a new one.
    pub async fn checkout(&self, affinity: Option<&str>) -> Result<Lease<I>, String> {
        let permit = self
            .inner
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| "pool is shut down".to_string())?;
        loop {
            let candidate = {
                let mut idle = self.inner.idle.lock().await;
                let pos = affinity
                    .and_then(|a| idle.iter().position(|i| i.instance.affinity() == Some(a)))
                    .or_else(|| {
                        // Prefer an instance holding no conversation, then the most recently used.
                        idle.iter()
                            .rposition(|i| i.instance.affinity().is_none())
                            .or(idle.len().checked_sub(1))
                    });
                pos.map(|p| idle.remove(p))
            };
            match candidate {
                Some(mut entry) => {
                    if entry.instance.is_alive() {
                        self.inner.busy.fetch_add(1, Ordering::SeqCst);
                        return Ok(Lease {
                            instance: entry.instance,
                            reused: true,
                            _permit: permit,
                        });
                    }
                    debug!("dropping dead idle instance");
                    self.discard(entry.instance, false).await;
                }
                None => {
                    let instance = self
                        .spawn()
                        .await
                        .ok_or_else(|| "cannot start a pool instance".to_string())?;
                    self.inner.busy.fetch_add(1, Ordering::SeqCst);
                    return Ok(Lease {
                        instance,
                        reused: false,
                        _permit: permit,
                    });
                }
            }
        }
    }

    /// Returns an instance after a task. `healthy = false` (crash, timeout, protocol error)
    /// replaces it.
    pub async fn checkin(&self, lease: Lease<I>, healthy: bool) {
        let Lease {
            mut instance,
            _permit: permit,
            ..
        } = lease;
        self.inner.busy.fetch_sub(1, Ordering::SeqCst);
        let closed = self.inner.closed.load(Ordering::SeqCst);
        // No liveness check here: the next checkout makes it (a system call per check, and one
        // per turn is enough) and replaces an instance that died after its reply.
        if healthy && !closed && !instance.needs_recycle() {
            self.park([instance]).await;
            return;
        }
        let recycled = healthy && instance.is_alive();
        self.discard(instance, recycled).await;
        drop(permit);
        if !closed {
            self.refill();
        }
    }

    async fn discard(&self, instance: I, recycled: bool) {
        self.inner.size.fetch_sub(1, Ordering::SeqCst);
        if recycled {
            self.inner.recycled.fetch_add(1, Ordering::SeqCst);
        } else {
            self.inner.failures.fetch_add(1, Ordering::SeqCst);
        }
        tokio::spawn(instance.stop());
    }

    /// Keeps at least `min` instances: a replacement starts in the background, holding a slot
    /// while it starts so the pool never exceeds `max` (no free slot: demand will spawn instead).
    fn refill(&self) {
        if self.inner.size.load(Ordering::SeqCst) >= self.inner.min {
            return;
        }
        let Ok(slot) = self.inner.permits.clone().try_acquire_owned() else {
            return;
        };
        let pool = self.clone();
        tokio::spawn(async move {
            pool.park(pool.spawn_warm().await).await;
            drop(slot);
        });
    }

    async fn reap_idle(&self) {
        let tick = (self.inner.idle_timeout / 4).max(Duration::from_millis(250));
        while !self.inner.closed.load(Ordering::SeqCst) {
            tokio::time::sleep(tick).await;
            let mut expired = Vec::new();
            {
                let mut idle = self.inner.idle.lock().await;
                let mut i = 0;
                while i < idle.len() {
                    let over_min =
                        self.inner.size.load(Ordering::SeqCst) - expired.len() > self.inner.min;
                    if over_min && idle[i].since.elapsed() > self.inner.idle_timeout {
                        expired.push(idle.remove(i).instance);
                    } else {
                        i += 1;
                    }
                }
            }
            for instance in expired {
                debug!("shrinking pool: idle instance stopped");
                self.inner.size.fetch_sub(1, Ordering::SeqCst);
                instance.stop().await;
            }
        }
    }

    pub async fn stats(&self) -> PoolStats {
        PoolStats {
            size: self.inner.size.load(Ordering::SeqCst),
            busy: self.inner.busy.load(Ordering::SeqCst),
            idle: self.inner.idle.lock().await.len(),
            min: self.inner.min,
            max: self.inner.max,
            spawned: self.inner.spawned.load(Ordering::SeqCst),
            warmed_up: self.inner.warmed_up.load(Ordering::SeqCst),
            recycled: self.inner.recycled.load(Ordering::SeqCst),
            failures: self.inner.failures.load(Ordering::SeqCst),
        }
    }

    /// Synchronous snapshot (skips the idle count if the list is being changed right now).
    pub fn stats_now(&self) -> PoolStats {
        PoolStats {
            size: self.inner.size.load(Ordering::SeqCst),
            busy: self.inner.busy.load(Ordering::SeqCst),
            idle: self.inner.idle.try_lock().map(|i| i.len()).unwrap_or(0),
            min: self.inner.min,
            max: self.inner.max,
            spawned: self.inner.spawned.load(Ordering::SeqCst),
            warmed_up: self.inner.warmed_up.load(Ordering::SeqCst),
            recycled: self.inner.recycled.load(Ordering::SeqCst),
            failures: self.inner.failures.load(Ordering::SeqCst),
        }
    }

    /// Waits for in-flight tasks (up to `deadline`), then stops every instance.
    pub async fn shutdown(&self, deadline: Duration) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let all = self.inner.max as u32;
        let _ = tokio::time::timeout(deadline, self.inner.permits.acquire_many(all)).await;
        self.inner.permits.close();
        let idle: Vec<_> = self.inner.idle.lock().await.drain(..).collect();
        for entry in idle {
            self.inner.size.fetch_sub(1, Ordering::SeqCst);
            entry.instance.stop().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake instance: `warm_up` fails for instances whose number is in `fail`.
    struct Fake {
        n: usize,
        warmed: Arc<Mutex<Vec<usize>>>,
        fail: Vec<usize>,
    }

    impl Instance for Fake {
        fn is_alive(&mut self) -> bool {
            true
        }
        fn needs_recycle(&mut self) -> bool {
            false
        }
        fn warm_up(&mut self) -> BoxFuture<'_, Result<(), String>> {
            Box::pin(async move {
                if self.fail.contains(&self.n) {
                    return Err("no".into());
                }
                self.warmed.lock().await.push(self.n);
                Ok(())
            })
        }
        fn stop(self) -> BoxFuture<'static, ()> {
            Box::pin(async {})
        }
    }

    fn pool(min: usize, max: usize, fail: Vec<usize>) -> (Pool<Fake>, Arc<Mutex<Vec<usize>>>) {
        let warmed = Arc::new(Mutex::new(Vec::new()));
        let (count, w) = (Arc::new(AtomicUsize::new(0)), warmed.clone());
        let spawner: Spawner<Fake> = Arc::new(move || {
            let n = count.fetch_add(1, Ordering::SeqCst);
            let (warmed, fail) = (w.clone(), fail.clone());
            Box::pin(async move { Ok(Fake { n, warmed, fail }) })
        });
        (
            Pool::new(min, max, Duration::from_secs(300), spawner),
            warmed,
        )
    }

    #[tokio::test]
    async fn instances_started_ahead_of_demand_warm_up_and_those_a_task_waits_for_do_not() {
        let (pool, warmed) = pool(2, 3, vec![]);
        pool.prewarm().await;
        assert_eq!(*warmed.lock().await, vec![0, 1]);
        let leases = [
            pool.checkout(None).await.unwrap(),
            pool.checkout(None).await.unwrap(),
            pool.checkout(None).await.unwrap(),
        ];
        // The third was started for a waiting task: no warm-up.
        assert!(leases[0].reused && leases[1].reused && !leases[2].reused);
        assert_eq!(warmed.lock().await.len(), 2);
        let stats = pool.stats().await;
        assert_eq!((stats.spawned, stats.warmed_up, stats.busy), (3, 2, 3));
    }

    #[tokio::test]
    async fn an_instance_failing_its_warm_up_is_replaced_by_demand() {
        let (pool, warmed) = pool(2, 2, vec![1]);
        pool.prewarm().await;
        assert_eq!(*warmed.lock().await, vec![0]);
        let stats = pool.stats().await;
        assert_eq!((stats.size, stats.idle, stats.failures), (1, 1, 1));
        let a = pool.checkout(None).await.unwrap();
        let b = pool.checkout(None).await.unwrap();
        assert_eq!((a.instance.n, b.instance.n), (0, 2));
        assert_eq!(pool.stats().await.size, 2);
    }

    #[tokio::test]
    async fn a_replacement_warms_up_before_it_is_handed_out() {
        let (pool, warmed) = pool(1, 1, vec![]);
        pool.prewarm().await;
        let lease = pool.checkout(None).await.unwrap();
        pool.checkin(lease, false).await; // crashed: replaced in the background
        let lease = pool.checkout(None).await.unwrap();
        assert_eq!(lease.instance.n, 1);
        assert_eq!(*warmed.lock().await, vec![0, 1]);
        assert_eq!(pool.stats().await.warmed_up, 2);
    }
}
