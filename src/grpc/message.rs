//! gRPC's framing, and reading a request's first message to learn whether
//! its call is unary and what it asks.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{request, Request};
use http_body::Body;
use tokio::time::Sleep;

use crate::grpc::body::RequestBody;
use crate::grpc::key::UnaryCall;
use crate::http::ResponseBody;

/// The length of a message's prefix on the wire: a compression flag, then
/// the message's length as a big-endian `u32`.
pub(crate) const PREFIX_LEN: usize = 5;

/// Whether the data read so far holds more than one message: a response
/// past that is a stream, and is not shared.
pub(crate) fn past_one_message(read: &VecDeque<Bytes>, len: usize) -> bool {
    declared_len(read).is_some_and(|message| len > PREFIX_LEN + message)
}

/// The length the first message's prefix declares, once all of it is read.
fn declared_len(read: &VecDeque<Bytes>) -> Option<usize> {
    let mut prefix = [0; PREFIX_LEN];
    let mut filled = 0;
    for chunk in read {
        let n = chunk.len().min(PREFIX_LEN - filled);
        prefix[filled..filled + n].copy_from_slice(&chunk[..n]);
        filled += n;
        if filled == PREFIX_LEN {
            let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
            return usize::try_from(len).ok();
        }
    }
    None
}

/// Whether the first message's compression flag is one gRPC defines: 0 for
/// a plain message, 1 for a compressed one.
fn known_flag(read: &VecDeque<Bytes>) -> bool {
    let flag = read.iter().find_map(|chunk| chunk.first());
    matches!(flag, Some(0 | 1))
}

/// What reading a request's body found.
pub(crate) enum Read<B: Body> {
    /// One whole message, and the body ended right after it: a unary call.
    Unary(UnaryCall),
    /// Anything else: the request as it came, with the bytes read so far in
    /// front of the rest of its body.
    Stream(Request<RequestBody<B>>),
}

/// How long a reader waits for a request's body, at most, before it takes the
/// call for a stream.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Waits {
    /// For the first message to be whole: a unary call's message comes right
    /// after its head, while a stream's client may wait for the server's
    /// answer before it sends anything.
    pub(crate) message: Duration,
    /// For the body to end after its first message: a unary call's ends at
    /// once, while a stream's next message may come only once the server has
    /// answered.
    pub(crate) end: Duration,
}

/// Reads a request's body until it knows whether the body is exactly one
/// message, waiting no longer than its [`Waits`] allow.
pub(crate) struct ReadMessage<B> {
    /// The request's head; taken when reading is done.
    head: Option<request::Parts>,
    /// The rest of the body; boxed, so that it can be handed on as it is.
    body: Option<Pin<Box<B>>>,
    read: VecDeque<Bytes>,
    len: usize,
    message_limit: usize,
    waits: Waits,
    /// Armed when the body first makes us wait, and again once the first
    /// message is whole; says which of the two it was armed for.
    timer: Option<(bool, Pin<Box<Sleep>>)>,
}

impl<B: Body> ReadMessage<B> {
    pub(crate) fn new(req: Request<B>, message_limit: usize, waits: Waits) -> Self {
        let (head, body) = req.into_parts();
        Self {
            head: Some(head),
            body: Some(Box::pin(body)),
            read: VecDeque::new(),
            len: 0,
            message_limit,
            waits,
            timer: None,
        }
    }

    /// Reads on; once ready, the reader is spent.
    ///
    /// # Panics
    ///
    /// When polled again after it was ready.
    pub(crate) fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Read<B>> {
        let body = self.body.as_mut().expect("a request is read once");
        loop {
            // The next frame, or a judgement on a body that makes us wait.
            let frame = match body.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(Some(Err(error))) => return Poll::Ready(self.stream(Err(error))),
                Poll::Ready(None) => return Poll::Ready(self.ended()),
                Poll::Pending => return self.pending(cx),
            };

            // Data: more than one message, or more than we may hold, is a
            // stream as far as we care.
            let mut data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => return Poll::Ready(self.trailers(frame.into_trailers().ok())),
            };
            if !data.has_remaining() {
                continue;
            }
            self.len += data.remaining();
            self.read.push_back(data.copy_to_bytes(data.remaining()));
            let too_long =
                declared_len(&self.read).is_some_and(|message| message > self.message_limit);
            if too_long || past_one_message(&self.read, self.len) {
                let body = self.body.take().expect("the body is still here");
                return Poll::Ready(self.stream(Ok(body)));
            }
        }
    }

    /// The body makes us wait: for the first message, or past it for the
    /// end, each for its own time at most.
    fn pending(&mut self, cx: &mut Context<'_>) -> Poll<Read<B>> {
        let ending = self.has_message();
        let wait = if ending {
            self.waits.end
        } else {
            self.waits.message
        };
        if !matches!(self.timer, Some((armed_for, _)) if armed_for == ending) {
            self.timer = Some((ending, Box::pin(tokio::time::sleep(wait))));
        }
        let (_, timer) = self.timer.as_mut().expect("the timer was just armed");
        if !wait.is_zero() && timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let body = self.body.take().expect("the body is still here");
        Poll::Ready(self.stream(Ok(body)))
    }

    /// The body ended: a unary call if it held exactly one well-formed
    /// message. Anything else goes to the inner service as it came, for it
    /// to judge.
    fn ended(&mut self) -> Read<B> {
        if !self.has_message() || !known_flag(&self.read) {
            return self.stream_ended();
        }
        let head = self.head.take().expect("a request is read once");
        let frame = concat(std::mem::take(&mut self.read), self.len);
        Read::Unary(UnaryCall::from_parts(head, frame))
    }

    /// Request trailers, which gRPC does not use: replayed, never shared.
    fn trailers(&mut self, trailers: Option<http::HeaderMap>) -> Read<B> {
        let data = concat(std::mem::take(&mut self.read), self.len);
        let body = RequestBody::new(ResponseBody::replay(data, trailers));
        Read::Stream(self.rebuild(body))
    }

    /// What was read, then the body's end.
    fn stream_ended(&mut self) -> Read<B> {
        let data = concat(std::mem::take(&mut self.read), self.len);
        let body = RequestBody::new(ResponseBody::replay(data, None));
        Read::Stream(self.rebuild(body))
    }

    /// What was read, then the rest of the body or the error that stopped it.
    fn stream(&mut self, rest: Result<Pin<Box<B>>, B::Error>) -> Read<B> {
        let read = std::mem::take(&mut self.read);
        let body = RequestBody::new(ResponseBody::resume(read, rest));
        Read::Stream(self.rebuild(body))
    }

    fn rebuild(&mut self, body: RequestBody<B>) -> Request<RequestBody<B>> {
        let head = self.head.take().expect("a request is read once");
        self.body = None;
        Request::from_parts(head, body)
    }

    /// Whether exactly one whole message has been read.
    fn has_message(&self) -> bool {
        declared_len(&self.read).is_some_and(|message| self.len == PREFIX_LEN + message)
    }
}

impl<B> fmt::Debug for ReadMessage<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadMessage")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Joins the chunks read, copying only when there are several.
fn concat(mut chunks: VecDeque<Bytes>, len: usize) -> Bytes {
    if chunks.len() <= 1 {
        return chunks.pop_front().unwrap_or_default();
    }
    let mut whole = BytesMut::with_capacity(len);
    for chunk in chunks {
        whole.extend_from_slice(&chunk);
    }
    whole.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&[u8]]) -> (VecDeque<Bytes>, usize) {
        let read: VecDeque<Bytes> = parts.iter().map(|p| Bytes::copy_from_slice(p)).collect();
        let len = read.iter().map(Bytes::len).sum();
        (read, len)
    }

    #[test]
    fn one_message_split_anywhere_is_not_past_one() {
        let (read, len) = chunks(&[&[0, 0, 0], &[0, 2, b'h'], b"i"]);
        assert_eq!(declared_len(&read), Some(2));
        assert!(!past_one_message(&read, len));
    }

    #[test]
    fn a_byte_of_a_second_message_is_past_one() {
        let (read, len) = chunks(&[&[0, 0, 0, 0, 1, b'a', 0]]);
        assert!(past_one_message(&read, len));
    }

    #[test]
    fn only_the_two_defined_compression_flags_are_known() {
        let flag = |byte: u8| known_flag(&chunks(&[&[], &[byte, 0, 0, 0, 0]]).0);
        assert!(flag(0));
        assert!(flag(1));
        assert!(!flag(2));
        assert!(!flag(0xff));
        assert!(!known_flag(&VecDeque::new()));
    }

    #[test]
    fn a_short_prefix_declares_nothing_yet() {
        let (read, len) = chunks(&[&[0, 0], &[0]]);
        assert_eq!(declared_len(&read), None);
        assert!(!past_one_message(&read, len));
    }
}
