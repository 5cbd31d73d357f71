//! dog's connection to one sheep: a client hello, then calls with typed errors.

use anyhow::{anyhow, Result};
use client::{ClientError, Connection};
use proto::msg::{self, Hello, Role, FEATURES_NONE};
use proto::{Header, Opcode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;

/// Timeout of one admin call (formatting and VDI creation included).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Sheep {
    pub addr: String,
    conn: Connection,
}

impl Sheep {
    pub async fn connect(addr: &str) -> Result<Sheep> {
        let hello = Hello {
            proto_version: proto::frame::PROTO_VERSION,
            role: Role::Client,
            node_uuid: None,
            cluster: None,
            features: FEATURES_NONE,
            auth: None,
        };
        let conn = Connection::connect(addr, &hello, |_| Ok(()))
            .await
            .map_err(|e| match e {
                ClientError::Connect { .. } | ClientError::Timeout { .. } => {
                    anyhow!("cannot reach sheep at {addr}: is it running? ({e})")
                }
                other => anyhow!("{other}"),
            })?;
        Ok(Sheep {
            addr: addr.to_string(),
            conn,
        })
    }

    /// A raw call; an error reply becomes an error with the sheep's message.
    pub async fn call(&self, h: Header, payload: Vec<u8>) -> Result<(Header, Vec<u8>)> {
        self.conn
            .call(h, payload, CALL_TIMEOUT)
            .await
            .map_err(|e| anyhow!("{e}"))
    }

    /// A control call with a JSON body and a JSON reply.
    pub async fn json<Req: Serialize, Rep: DeserializeOwned>(
        &self,
        op: Opcode,
        req: &Req,
    ) -> Result<Rep> {
        let (_, body) = self
            .call(Header::request(op, 0, 0), msg::encode(req))
            .await?;
        msg::decode(&body).map_err(|e| anyhow!("bad reply from {}: {e}", self.addr))
    }

    /// A control call, with the client's typed error (to tell a lost connection apart).
    pub async fn op_raw<Req: Serialize>(&self, op: Opcode, req: &Req) -> Result<(), ClientError> {
        self.conn
            .call(Header::request(op, 0, 0), msg::encode(req), CALL_TIMEOUT)
            .await
            .map(|_| ())
    }

    /// A control call whose reply is empty.
    pub async fn op<Req: Serialize>(&self, op: Opcode, req: &Req) -> Result<()> {
        self.call(Header::request(op, 0, 0), msg::encode(req))
            .await
            .map(|_| ())
    }
}
