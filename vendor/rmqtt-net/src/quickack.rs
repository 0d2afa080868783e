//! Nexus patch: an accepted TCP connection that does not make clients wait for a delayed ACK.
//!
//! Linux delays the ACK of received data (up to ~40 ms) in the hope of sending it with the
//! answer. A client that leaves Nagle's algorithm on holds its next small packet until its
//! previous one is acknowledged, so after a packet the broker does not answer (a PUBACK, a
//! QoS 0 publish), its next command or publish waits for that delayed ACK. With `quickack`,
//! when the broker has read data, and has written nothing since even after the connection's
//! task had one more turn (an answer such as a PUBACK is often written just after the read),
//! it sets TCP_QUICKACK: the kernel sends the pending ACK at once. A connection that is
//! answered carries its ACKs with the answer as before, so this costs a wake-up and a system
//! call only when a connection goes quiet after a packet the broker does not answer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// An accepted TCP connection (see the module documentation)
#[derive(Debug)]
pub struct TcpStream {
    inner: tokio::net::TcpStream,
    quickack: bool,
    /// Data was read and nothing written since: its ACK is still the kernel's to delay.
    unanswered: bool,
    /// Nothing more to read and still unanswered: the task was woken for one more turn.
    armed: bool,
}

impl TcpStream {
    pub(crate) fn new(inner: tokio::net::TcpStream, quickack: bool) -> Self {
        TcpStream { inner, quickack, unanswered: false, armed: false }
    }

    /// The connection itself
    pub fn get_ref(&self) -> &tokio::net::TcpStream {
        &self.inner
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn ack_now(&self) {
        // Best effort: a failure only leaves the kernel's usual delayed ACK.
        let _ = socket2::SockRef::from(&self.inner).set_quickack(true);
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn ack_now(&self) {}
}

impl AsyncRead for TcpStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.quickack {
            match res {
                Poll::Ready(Ok(())) if buf.filled().len() > before => {
                    this.unanswered = true;
                    this.armed = false;
                }
                Poll::Pending if this.unanswered && this.armed => {
                    this.unanswered = false;
                    this.armed = false;
                    this.ack_now();
                }
                Poll::Pending if this.unanswered => {
                    // Give the task one more turn to write an answer the ACK can go with.
                    this.armed = true;
                    cx.waker().wake_by_ref();
                }
                _ => {}
            }
        }
        res
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            // The ACK goes out with what was written.
            this.unanswered = false;
            this.armed = false;
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            this.unanswered = false;
            this.armed = false;
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
