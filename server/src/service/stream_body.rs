//! The HTTP side of `Subscribe`, written out instead of tonic's `Grpc::server_streaming`: the
//! request message is decoded with tonic's decoder as usual, but the response body is this
//! module's [`EventBody`], which frames the Hub's already-encoded event bytes itself.
//!
//! tonic's encoder copies every message into its own buffer, then splits it off as a DATA frame,
//! through a stack of generic adapters polled on every delivery. Here one event becomes one
//! allocation holding the 5-byte gRPC message prefix and the event; events already queued when
//! the stream is polled (or already read for its replay) are framed into the same DATA frame (up
//! to [`COALESCE`], by [`Messages::append_waiting`]: the queued ones under one lock), so a burst
//! or a replay's page is still one write. The
//! stream's end or error becomes the gRPC trailers, as with tonic.
use std::{
    pin::{Pin, pin},
    task::{Context, Poll, ready},
};

use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderValue, header::CONTENT_TYPE};
use http_body::Frame;
use orgpulse::proto::OrgFilter;
use tonic::{Request, Response, Status, codec::Codec, codec::Streaming};
use tonic_prost::ProstCodec;

/// The encoded events (and control events) of one `Subscribe` stream.
pub type EventStream = Box<dyn Messages>;

/// One encoded message of a stream: made for it (a control event, a replayed one), or a live
/// event shared with every queue it went to, framed from there without a copy of its handle.
pub enum Outgoing {
    Made(Bytes),
    Queued(crate::hub::Item),
}

impl std::ops::Deref for Outgoing {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Outgoing::Made(bytes) => bytes,
            Outgoing::Queued(item) => &item.bytes,
        }
    }
}

/// A stream of encoded messages that can also hand over, at once, those already waiting.
pub trait Messages: Stream<Item = Result<Outgoing, Status>> + Send + Unpin + 'static {
    /// Appends the messages that are waiting now (each with its gRPC prefix, see
    /// [`put_message`]) to `frame` while it holds fewer than `limit` bytes; never waits (`cx` is
    /// the body's, for what it polls). What needs more than a ready message (the end, a timer)
    /// is left to `poll_next`.
    fn append_waiting(&mut self, frame: &mut BytesMut, limit: usize, cx: &mut Context<'_>);
}

/// Most bytes of queued events framed into one DATA frame before it is handed to HTTP/2.
const COALESCE: usize = 32 * 1024;

/// Decodes the `OrgFilter` of a Subscribe call (at most `max_request` bytes, uncompressed), runs
/// `handler` and answers with its stream, or with its error as a trailers-only response.
pub async fn server_streaming<B, F, Fut>(
    req: http::Request<B>,
    max_request: usize,
    handler: F,
) -> http::Response<tonic::body::Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
    F: FnOnce(Request<OrgFilter>) -> Fut,
    Fut: Future<Output = Result<Response<EventStream>, Status>>,
{
    let (parts, body) = req.into_parts();
    if let Some(encoding) = parts.headers.get("grpc-encoding")
        && encoding != "identity"
    {
        let encoding = String::from_utf8_lossy(encoding.as_bytes());
        return Status::unimplemented(format!(
            "the request is compressed with {encoding}; orgpulse accepts uncompressed requests"
        ))
        .into_http();
    }
    let decoder = ProstCodec::<OrgFilter, OrgFilter>::default().decoder();
    let mut messages = pin!(Streaming::new_request(
        decoder,
        body,
        None,
        Some(max_request)
    ));
    let filter = match messages.try_next().await {
        Ok(Some(filter)) => filter,
        Ok(None) => return Status::internal("Missing request message.").into_http(),
        Err(status) => return status.into_http(),
    };
    match handler(Request::from_http(http::Request::from_parts(parts, filter))).await {
        Err(status) => status.into_http(),
        Ok(response) => {
            let (metadata, stream, extensions) = response.into_parts();
            let mut http = http::Response::new(tonic::body::Body::new(EventBody::new(stream)));
            *http.headers_mut() = metadata.into_headers();
            http.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            *http.extensions_mut() = extensions;
            http
        }
    }
}

/// A gRPC response body of already-encoded messages: DATA frames, then the trailers.
pub struct EventBody {
    stream: EventStream,
    /// Set once the stream has ended: the trailers still to send (None once sent). Boxed: a
    /// `HeaderMap` is ~100 bytes that every open stream would carry until its end.
    trailers: Option<Box<HeaderMap>>,
    done: bool,
}

impl EventBody {
    pub fn new(stream: EventStream) -> Self {
        EventBody {
            stream,
            trailers: None,
            done: false,
        }
    }

    /// The stream ended (`None`) or failed: the trailers say which.
    fn finish(&mut self, end: Option<Result<Outgoing, Status>>) {
        let status = match end {
            Some(Err(status)) => status,
            _ => Status::ok(""),
        };
        let mut trailers = HeaderMap::new();
        if let Err(unsendable) = status.add_header(&mut trailers) {
            trailers.clear();
            // Only a message that is not a valid header value gets here; its code still goes.
            let _ = Status::new(unsendable.code(), "").add_header(&mut trailers);
        }
        self.trailers = Some(Box::new(trailers));
        self.done = true;
    }
}

/// Appends one message with its gRPC prefix: not compressed, 4-byte big-endian length.
pub fn put_message(buf: &mut BytesMut, message: &[u8]) {
    buf.put_u8(0);
    buf.put_u32(message.len() as u32);
    buf.put_slice(message);
}

impl http_body::Body for EventBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(*t))));
        }
        let first = match ready!(this.stream.poll_next_unpin(cx)) {
            Some(Ok(message)) => message,
            end => {
                this.finish(end);
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(*t))));
            }
        };
        let mut frame = BytesMut::with_capacity(5 + first.len());
        put_message(&mut frame, &first);
        this.stream.append_waiting(&mut frame, COALESCE, cx);
        Poll::Ready(Some(Ok(Frame::data(frame.freeze()))))
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }
}
