//! A UDP echo service: the demo's and the tests' private service.
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

pub struct EchoServer {
    pub addr: SocketAddr,
    pub echoed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn spawn(bind: SocketAddr) -> std::io::Result<Self> {
        let socket = UdpSocket::bind(bind)?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = socket.local_addr()?;
        let echoed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (e, s) = (echoed.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("echo".into())
            .spawn(move || serve(&socket, &e, &s))?;
        Ok(EchoServer {
            addr,
            echoed,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Echoes every datagram back to its sender until `stop` is set.
pub fn serve(socket: &UdpSocket, echoed: &AtomicU64, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65535];
    while !stop.load(Ordering::SeqCst) {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                // Count before sending: a caller that has the reply must already see
                // the count (counting after the send raced with fast readers).
                echoed.fetch_add(1, Ordering::SeqCst);
                if socket.send_to(&buf[..n], from).is_err() {
                    echoed.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => tracing::debug!("echo: {e}"),
        }
    }
}
