//! A pull's link that sends a page the store keeps compressed as it is kept: the
//! engine reads every page plain (the store expanded it and checked it against its
//! hash) and sends PAGE; when the store handed the same page's compressed bytes over
//! ([`PackedPages`]), the ZPAGE frame of those bytes goes instead, so the server does
//! no compression work for a pull and sends fewer bytes. Only for a peer that agreed
//! to zstd; every other frame passes as it is.

use crate::Result;
use crate::engine::{ChannelLink, Link};
use crate::protocol::compress::PackedPages;
use crate::protocol::{Frame, code};

/// The engine's channel link, sending stored compressed pages as ZPAGE.
pub(super) struct PackedLink<'a> {
    link: &'a mut ChannelLink,
    packed: PackedPages,
}

impl<'a> PackedLink<'a> {
    /// `link`, with the compressed pages the store hands to `packed`.
    pub fn new(link: &'a mut ChannelLink, packed: PackedPages) -> PackedLink<'a> {
        PackedLink { link, packed }
    }
}

impl Link for PackedLink<'_> {
    fn send(&mut self, frame: &Frame) -> Result<()> {
        if let Frame::Page { pgno, data } = frame {
            return self.send_page(*pgno, data);
        }
        self.link.send(frame)
    }

    fn send_page(&mut self, pgno: u32, data: &[u8]) -> Result<()> {
        // Only the bytes of this very page (number and fingerprint) go in its place.
        match self.packed.take(pgno, data) {
            Some(p) => {
                let mut frame = Vec::with_capacity(5 + p.bytes.len());
                frame.push(code::ZPAGE);
                frame.extend_from_slice(&pgno.to_be_bytes());
                frame.extend_from_slice(&p.bytes);
                self.link.send_bytes(frame)
            }
            None => self.link.send_page(pgno, data),
        }
    }

    fn recv(&mut self) -> Result<Frame> {
        self.link.recv()
    }

    fn try_recv(&mut self) -> Result<Option<Frame>> {
        self.link.try_recv()
    }

    fn bytes_sent(&self) -> u64 {
        self.link.bytes_sent()
    }

    fn bytes_received(&self) -> u64 {
        self.link.bytes_received()
    }

    fn unsent_nodes(&self) -> u32 {
        self.link.unsent_nodes()
    }
}
