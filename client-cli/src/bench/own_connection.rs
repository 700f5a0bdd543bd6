//! A bench subscriber's HTTP/2 connection of its own, read frame by frame: its one request
//! (stream 1) spoken through h2's frame codec instead of h2's client. The client's connection
//! task, its stream store and the hand-over of each DATA frame to the stream's task (a lock and a
//! wake-up per frame) are gone: the subscriber's task reads the socket and counts what it read.
//! At presence's 1 M deliveries a second on the bench's one core, that hand-over was a tenth of
//! the bench's CPU, and the bench's CPU is what its latency tail follows. Streams multiplexed
//! over a shared connection still go through h2's client (subscriber.rs).
use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use h2::{
    Codec,
    frame::{self, Frame, Pseudo, StreamId},
};
use http::HeaderMap;
use tokio::{io::AsyncWriteExt, net::TcpStream};

/// The receive window of the stream and of the connection, as h2's client had it (see
/// `subscriber::connect`): DATA bytes are given back once half of it is used.
const WINDOW: u32 = 1 << 20;
/// The one stream.
const STREAM: u32 = 1;

/// An HTTP/2 connection carrying one request, whose response body is read here.
pub struct OwnConnection {
    codec: Codec<TcpStream, Bytes>,
    /// DATA bytes received and not yet given back to the server's send windows.
    unreturned: u32,
}

impl OwnConnection {
    /// Connects from `source`, sends `POST path` with `headers` and the whole body `message` on
    /// stream 1, and reads up to the response's headers. Returns them, or the trailers of a
    /// response that ended at once (gRPC's Trailers-Only: a refusal).
    pub async fn post(
        server: SocketAddr,
        source: IpAddr,
        path: &str,
        headers: HeaderMap,
        message: Bytes,
    ) -> Result<(OwnConnection, Response), String> {
        let mut tcp = super::subscriber::tcp(server, source).await?;
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .map_err(|e| format!("HTTP/2 preface: {e}"))?;
        let mut conn = OwnConnection {
            codec: Codec::new(tcp),
            unreturned: 0,
        };
        let mut settings = frame::Settings::default();
        settings.set_initial_window_size(Some(WINDOW));
        settings.set_enable_push(false);
        let uri = format!("http://{server}{path}")
            .parse()
            .map_err(|e| format!("{path}: {e}"))?;
        let request = frame::Headers::new(
            STREAM.into(),
            Pseudo::request(http::Method::POST, uri, None),
            headers,
        );
        let mut body = frame::Data::new(STREAM.into(), message);
        body.set_end_stream(true);
        conn.send([
            Frame::Settings(settings),
            // The connection's window starts at 65,535 bytes whatever SETTINGS say.
            Frame::WindowUpdate(frame::WindowUpdate::new(StreamId::zero(), WINDOW - 65_535)),
            Frame::Headers(request),
            Frame::Data(body),
        ])
        .await?;
        loop {
            match conn.frame().await? {
                Some(Frame::Headers(h)) if u32::from(h.stream_id()) == STREAM => {
                    let ended = h.is_end_stream();
                    let (pseudo, fields) = h.into_parts();
                    return Ok((
                        conn,
                        Response {
                            status: pseudo.status,
                            fields,
                            ended,
                        },
                    ));
                }
                Some(_) => {}
                None => return Err("the connection closed before a response".into()),
            }
        }
    }

    /// The stream's next DATA payload, or its trailers.
    pub async fn data(&mut self) -> Result<Received, String> {
        loop {
            match self.frame().await? {
                Some(Frame::Data(d)) if u32::from(d.stream_id()) == STREAM => {
                    if d.is_end_stream() {
                        return Err("the stream ended without trailers".into());
                    }
                    let payload = d.into_payload();
                    self.give_back(payload.len() as u32).await?;
                    return Ok(Received::Data(payload));
                }
                Some(Frame::Headers(h)) if u32::from(h.stream_id()) == STREAM => {
                    return Ok(Received::Trailers(h.into_fields()));
                }
                Some(_) => {}
                None => return Err("the connection closed".into()),
            }
        }
    }

    /// The next frame for the stream, after answering the connection's own (SETTINGS, PING);
    /// None when the connection closed. A GOAWAY or a reset of the stream is an error.
    async fn frame(&mut self) -> Result<Option<Frame>, String> {
        loop {
            let frame = match self.codec.next().await {
                Some(f) => f.map_err(|e| format!("connection: {e}"))?,
                None => return Ok(None),
            };
            match frame {
                Frame::Settings(s) if !s.is_ack() => {
                    if let Some(size) = s.header_table_size() {
                        self.codec.set_send_header_table_size(size as usize);
                    }
                    self.send([Frame::Settings(frame::Settings::ack())]).await?;
                }
                Frame::Ping(p) if !p.is_ack() => {
                    let pong = frame::Ping::pong(p.into_payload());
                    self.send([Frame::Ping(pong)]).await?;
                }
                Frame::GoAway(g) => return Err(format!("GOAWAY {:?}", g.reason())),
                Frame::Reset(r) => return Err(format!("stream reset: {:?}", r.reason())),
                Frame::Data(d) if d.is_padded() => {
                    return Err("a padded DATA frame (not counted in the windows here)".into());
                }
                Frame::Settings(_)
                | Frame::Ping(_)
                | Frame::WindowUpdate(_)
                | Frame::Priority(_)
                | Frame::PushPromise(_) => {}
                other => return Ok(Some(other)),
            }
        }
    }

    /// Counts `len` received DATA bytes; once half the window is used, gives it back to the
    /// stream's and the connection's send windows.
    async fn give_back(&mut self, len: u32) -> Result<(), String> {
        self.unreturned += len;
        if self.unreturned < WINDOW / 2 {
            return Ok(());
        }
        let n = std::mem::take(&mut self.unreturned);
        self.send([
            Frame::WindowUpdate(frame::WindowUpdate::new(StreamId::zero(), n)),
            Frame::WindowUpdate(frame::WindowUpdate::new(STREAM.into(), n)),
        ])
        .await
    }

    /// Writes `frames` and flushes them.
    async fn send<const N: usize>(&mut self, frames: [Frame; N]) -> Result<(), String> {
        for f in frames {
            self.codec.feed(f).await.map_err(|e| format!("send: {e}"))?;
        }
        SinkExt::flush(&mut self.codec)
            .await
            .map_err(|e| format!("send: {e}"))
    }
}

/// The response's headers: its HTTP status, its fields, and whether the stream ended with them
/// (then the fields are the trailers).
pub struct Response {
    pub status: Option<http::StatusCode>,
    pub fields: HeaderMap,
    pub ended: bool,
}

/// What the stream received next.
pub enum Received {
    Data(Bytes),
    Trailers(HeaderMap),
}
