//! Messages that carry open file descriptors over a unix stream socket: how a
//! shell hands its public ports' listening sockets to the shell that takes
//! over from it, and how it talks to its keeper ([`crate::keeper`]).
//!
//! A message is a frame — a 4-byte big-endian length, then a record encoded
//! by `wire`'s codec (bounded like any frame) — sent with one `sendmsg` whose
//! `SCM_RIGHTS` carries the descriptors. The receiver reads the length with
//! `recvmsg` and room for [`MAX_FDS`] descriptors (received close-on-exec),
//! then the payload. A descriptor is never lost silently: a message whose
//! descriptors did not fit is [`FdPassError::Truncated`], and the ones that
//! did arrive are closed with it.
//!
//! The calls block; callers run them on threads of their own (or
//! `spawn_blocking`) and bound them with the socket's read timeout.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use wire::codec::{DEFAULT_FRAME_LIMIT, FrameError, decode_record, encode_record};

/// Most descriptors one message carries.
pub const MAX_FDS: usize = 64;

/// Why a message could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum FdPassError {
    /// The peer closed the socket before a message began.
    #[error("the other end closed the channel")]
    Closed,
    /// Reading or writing failed (a read timeout included).
    #[error("the channel failed: {0}")]
    Io(#[from] std::io::Error),
    /// The length announced is over the frame limit.
    #[error("a message of {0} bytes is over the limit of {DEFAULT_FRAME_LIMIT}")]
    TooLarge(u32),
    /// More descriptors than [`MAX_FDS`].
    #[error("a message may carry at most {MAX_FDS} descriptors, not {0}")]
    TooManyFds(usize),
    /// The descriptors did not all arrive (`MSG_CTRUNC`).
    #[error("the message's descriptors were cut short")]
    Truncated,
    /// The payload does not decode as the message expected.
    #[error("a malformed message: {0}")]
    Malformed(#[from] FrameError),
}

/// Sends `msg` with `fds`.
pub fn send<T: Serialize>(
    sock: &UnixStream,
    msg: &T,
    fds: &[BorrowedFd<'_>],
) -> Result<(), FdPassError> {
    if fds.len() > MAX_FDS {
        return Err(FdPassError::TooManyFds(fds.len()));
    }
    let payload = encode_record(msg)?;
    let len = u32::try_from(payload.len()).map_err(|_| FdPassError::TooLarge(u32::MAX))?;
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&payload);
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(FdPassError::TooManyFds(fds.len()));
    }
    // The descriptors travel with the first byte; the rest, if the socket
    // took only part of the frame, follows plainly.
    let sent = loop {
        match sendmsg(
            sock,
            &[IoSlice::new(&frame)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(n) => break n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(std::io::Error::from(e).into()),
        }
    };
    let mut rest = sock;
    rest.write_all(&frame[sent..])?;
    Ok(())
}

/// Receives one message and the descriptors it carried.
pub fn recv<T: DeserializeOwned>(sock: &UnixStream) -> Result<(T, Vec<OwnedFd>), FdPassError> {
    let mut header = [0u8; 4];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = loop {
        match recvmsg(
            sock,
            &mut [IoSliceMut::new(&mut header)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(r) => break r,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(std::io::Error::from(e).into()),
        }
    };
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if got.flags.contains(ReturnFlags::CTRUNC) {
        return Err(FdPassError::Truncated);
    }
    if fds.len() > MAX_FDS {
        return Err(FdPassError::TooManyFds(fds.len()));
    }
    if got.bytes == 0 {
        return Err(FdPassError::Closed);
    }
    let mut rest = sock;
    rest.read_exact(&mut header[got.bytes..])?;
    let len = u32::from_be_bytes(header);
    if len as usize > DEFAULT_FRAME_LIMIT {
        return Err(FdPassError::TooLarge(len));
    }
    let mut payload = vec![0u8; len as usize];
    rest.read_exact(&mut payload)?;
    Ok((decode_record(&payload)?, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Ports {
        names: Vec<String>,
    }

    #[test]
    fn a_listening_socket_sent_keeps_accepting_in_the_receiver() {
        let (a, b) = UnixStream::pair().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let msg = Ports {
            names: vec!["main".into()],
        };
        send(&a, &msg, &[listener.as_fd()]).unwrap();
        // The sender lets go of its copy; the port stays open in the receiver.
        drop(listener);
        let (got, fds): (Ports, _) = recv(&b).unwrap();
        assert_eq!(got, msg);
        assert_eq!(fds.len(), 1);
        let received = TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(received.local_addr().unwrap(), addr);
        let mut client = TcpStream::connect(addr).unwrap();
        let (mut served, _) = received.accept().unwrap();
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        served.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[test]
    fn messages_without_descriptors_and_several_in_a_row() {
        let (a, b) = UnixStream::pair().unwrap();
        for i in 0..3 {
            send(
                &a,
                &Ports {
                    names: vec![i.to_string(); i],
                },
                &[],
            )
            .unwrap();
        }
        let (l1, l2) = (
            TcpListener::bind("127.0.0.1:0").unwrap(),
            TcpListener::bind("127.0.0.1:0").unwrap(),
        );
        send(&a, &Ports { names: vec![] }, &[l1.as_fd(), l2.as_fd()]).unwrap();
        for i in 0..3 {
            let (got, fds): (Ports, _) = recv(&b).unwrap();
            assert_eq!(got.names.len(), i);
            assert!(fds.is_empty());
        }
        let (_, fds): (Ports, _) = recv(&b).unwrap();
        assert_eq!(fds.len(), 2);
        drop(a);
        assert!(matches!(recv::<Ports>(&b), Err(FdPassError::Closed)));
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let (a, b) = UnixStream::pair().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let many = vec![listener.as_fd(); MAX_FDS + 1];
        assert!(matches!(
            send(&a, &Ports { names: vec![] }, &many),
            Err(FdPassError::TooManyFds(n)) if n == MAX_FDS + 1
        ));
        // A length over the limit, then a payload that is not the message.
        let mut raw = &a;
        raw.write_all(&u32::MAX.to_be_bytes()).unwrap();
        assert!(matches!(recv::<Ports>(&b), Err(FdPassError::TooLarge(_))));
        let (a, b) = UnixStream::pair().unwrap();
        let mut raw = &a;
        raw.write_all(&3u32.to_be_bytes()).unwrap();
        raw.write_all(&[0xff, 0xff, 0xff]).unwrap();
        assert!(matches!(recv::<Ports>(&b), Err(FdPassError::Malformed(_))));
        // More descriptors than a message may carry, sent by hand: refused,
        // none of them kept open; far more: cut short by the kernel.
        for (count, truncated) in [(MAX_FDS + 1, false), (200, true)] {
            let (a, b) = UnixStream::pair().unwrap();
            let fds = vec![listener.as_fd(); count];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(200))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
            let frame = [0u8, 0, 0, 0];
            sendmsg(
                &a,
                &[IoSlice::new(&frame)],
                &mut control,
                SendFlags::empty(),
            )
            .unwrap();
            let r = recv::<Ports>(&b);
            match truncated {
                true => assert!(matches!(r, Err(FdPassError::Truncated)), "{r:?}"),
                false => assert!(
                    matches!(r, Err(FdPassError::TooManyFds(n)) if n == count),
                    "{r:?}"
                ),
            }
        }
        // A frame cut short by the peer going away.
        let (a, b) = UnixStream::pair().unwrap();
        let mut raw = &a;
        raw.write_all(&10u32.to_be_bytes()).unwrap();
        drop(a);
        assert!(matches!(recv::<Ports>(&b), Err(FdPassError::Io(_))));
    }
}
