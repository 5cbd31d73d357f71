//! One shared connection per peer address, reopened after failure.

use crate::connection::{Connection, Reply};
use crate::ClientError;
use proto::msg::Hello;
use proto::Header;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

type Acceptor = dyn Fn(&Hello) -> Result<(), String> + Send + Sync;

/// Connections to peers by address.
pub struct Pool {
    hello: std::sync::RwLock<Hello>,
    accept: Arc<Acceptor>,
    /// One slot per address, so connecting to a dead peer blocks only calls to it.
    conns: std::sync::Mutex<HashMap<String, Slot>>,
}

type Slot = Arc<Mutex<Option<Arc<Connection>>>>;

impl Pool {
    /// `accept` checks every peer's hello (cluster identity, versions).
    pub fn new(hello: Hello, accept: Arc<Acceptor>) -> Pool {
        Pool {
            hello: std::sync::RwLock::new(hello),
            accept,
            conns: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Changes the hello sent on new connections (after format) and drops old connections.
    pub async fn set_hello(&self, hello: Hello) {
        *self.hello.write().unwrap_or_else(|p| p.into_inner()) = hello;
        self.slots().clear();
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, addr: &str) -> Slot {
        self.slots().entry(addr.to_string()).or_default().clone()
    }

    async fn get(&self, addr: &str) -> Result<Arc<Connection>, ClientError> {
        let slot = self.slot(addr);
        let mut conn = slot.lock().await;
        if let Some(c) = conn.as_ref() {
            if c.is_alive() {
                return Ok(c.clone());
            }
        }
        let hello = self.hello.read().unwrap_or_else(|p| p.into_inner()).clone();
        let accept = self.accept.clone();
        let c = Arc::new(Connection::connect(addr, &hello, move |h| accept(h)).await?);
        *conn = Some(c.clone());
        Ok(c)
    }

    /// One call to `addr`, connecting first if needed.
    pub async fn call(
        &self,
        addr: &str,
        header: Header,
        payload: impl Into<crate::Payload>,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        let conn = self.get(addr).await?;
        let result = conn.call(header, payload, timeout).await;
        if matches!(
            result,
            Err(ClientError::Disconnected { .. }) | Err(ClientError::Timeout { .. })
        ) {
            let slot = self.slot(addr);
            let mut current = slot.lock().await;
            if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn)) {
                *current = None;
            }
        }
        result
    }
}
