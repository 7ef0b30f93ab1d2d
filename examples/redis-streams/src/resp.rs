//! Just enough of Redis's RESP2 protocol for the example: commands out, replies in, every call
//! bounded by a timeout.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `+OK`.
    Simple(String),
    /// `-ERR ...`: the command failed; the connection is fine.
    Error(String),
    /// `:1`.
    Int(i64),
    /// `$n` bytes, or nil.
    Bulk(Option<Vec<u8>>),
    /// `*n` replies, or nil.
    Array(Option<Vec<Reply>>),
}

/// Appends `args` as one command.
pub fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Parses one reply at the start of `buf`: `Ok(None)` when more bytes are needed.
fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
    let line = std::str::from_utf8(&buf[1..end]).map_err(|e| format!("not UTF-8: {e}"))?;
    let after = end + 2;
    let number = || line.parse::<i64>().map_err(|e| format!("bad length {line:?}: {e}"));
    match buf.first() {
        Some(b'+') => Ok(Some((Reply::Simple(line.to_owned()), after))),
        Some(b'-') => Ok(Some((Reply::Error(line.to_owned()), after))),
        Some(b':') => Ok(Some((Reply::Int(number()?), after))),
        Some(b'$') => {
            let n = number()?;
            if n < 0 {
                return Ok(Some((Reply::Bulk(None), after)));
            }
            let n = n as usize;
            if buf.len() < after + n + 2 {
                return Ok(None);
            }
            Ok(Some((Reply::Bulk(Some(buf[after..after + n].to_vec())), after + n + 2)))
        }
        Some(b'*') => {
            let n = number()?;
            if n < 0 {
                return Ok(Some((Reply::Array(None), after)));
            }
            let (mut items, mut at) = (Vec::with_capacity(n as usize), after);
            for _ in 0..n {
                let Some((item, used)) = parse(&buf[at..])? else { return Ok(None) };
                items.push(item);
                at += used;
            }
            Ok(Some((Reply::Array(Some(items)), at)))
        }
        other => Err(format!("unexpected reply type {other:?}")),
    }
}

/// One connection.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    timeout: Duration,
}

impl Conn {
    /// Connects to `addr` within `timeout`; every later call has the same bound.
    pub async fn open(addr: &str, timeout: Duration) -> Result<Conn, String> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connecting to {addr} timed out after {timeout:?}"))?
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(Conn { stream, buf: Vec::new(), timeout })
    }

    /// Sends `commands` (already encoded, `n` of them) and reads their `n` replies.
    pub async fn call(&mut self, commands: &[u8], n: usize, extra: Duration) -> Result<Vec<Reply>, String> {
        let bound = self.timeout + extra;
        tokio::time::timeout(bound, self.exchange(commands, n))
            .await
            .map_err(|_| format!("no answer within {bound:?}"))?
    }

    async fn exchange(&mut self, commands: &[u8], n: usize) -> Result<Vec<Reply>, String> {
        self.stream.write_all(commands).await.map_err(|e| format!("writing: {e}"))?;
        let mut replies = Vec::with_capacity(n);
        while replies.len() < n {
            match parse(&self.buf)? {
                Some((reply, used)) => {
                    self.buf.drain(..used);
                    replies.push(reply);
                }
                None => {
                    let mut chunk = [0u8; 64 * 1024];
                    let got = self.stream.read(&mut chunk).await.map_err(|e| format!("reading: {e}"))?;
                    if got == 0 {
                        return Err("the server closed the connection".into());
                    }
                    self.buf.extend_from_slice(&chunk[..got]);
                }
            }
        }
        Ok(replies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nested_replies_and_waits_for_more() {
        let wire = b"*2\r\n$3\r\n1-0\r\n*2\r\n$4\r\ndata\r\n$2\r\n{}\r\n";
        let (reply, used) = parse(wire).unwrap().unwrap();
        assert_eq!(used, wire.len());
        let Reply::Array(Some(items)) = reply else { panic!() };
        assert_eq!(items[0], Reply::Bulk(Some(b"1-0".to_vec())));
        assert_eq!(parse(&wire[..wire.len() - 3]).unwrap(), None);
        assert_eq!(parse(b"$-1\r\n").unwrap(), Some((Reply::Bulk(None), 5)));
        assert!(parse(b"?x\r\n").is_err());
    }
}
