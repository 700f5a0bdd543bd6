use slab::Slab;

/// Buffers frames for multiple streams.
#[derive(Debug)]
pub struct Buffer<T> {
    slab: Slab<Slot<T>>,
}

/// A sequence of frames in a `Buffer`
#[derive(Debug)]
pub struct Deque {
    indices: Option<Indices>,
}

/// Tracks the head & tail for a sequence of frames in a `Buffer`. (u32 slab keys: every stream
/// holds two of these, and a connection never has 2^32 frames queued.)
#[derive(Debug, Default, Copy, Clone)]
struct Indices {
    head: u32,
    tail: u32,
}

#[derive(Debug)]
struct Slot<T> {
    value: T,
    next: Option<u32>,
}

/// Inserts `slot` into `slab`, its key as a u32.
fn insert<T>(slab: &mut Slab<Slot<T>>, slot: Slot<T>) -> u32 {
    reserve_one(slab);
    u32::try_from(slab.insert(slot)).expect("fewer than 2^32 queued frames")
}

impl<T> Buffer<T> {
    pub fn new() -> Self {
        Buffer { slab: Slab::new() }
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }
}

/// Makes room for one more value in `slab`: one slot at first, then an eighth more each time.
/// (`Vec` starts at four slots, which for h2's streams and frames is a kilobyte or more that a
/// connection with one open stream never uses, and doubles: up to half of a connection's
/// `Stream`s, ~290 bytes each, would be empty slots; an eighth bounds that at ~12 %, for a
/// copy of the slab every eighth of its size.)
pub(crate) fn reserve_one<T>(slab: &mut Slab<T>) {
    if slab.len() == slab.capacity() {
        slab.reserve_exact((slab.capacity() / 8).max(1));
    }
}

impl Deque {
    pub fn new() -> Self {
        Deque { indices: None }
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_none()
    }

    pub fn push_back<T>(&mut self, buf: &mut Buffer<T>, value: T) {
        let key = insert(&mut buf.slab, Slot { value, next: None });

        match self.indices {
            Some(ref mut idxs) => {
                buf.slab[idxs.tail as usize].next = Some(key);
                idxs.tail = key;
            }
            None => {
                self.indices = Some(Indices {
                    head: key,
                    tail: key,
                });
            }
        }
    }

    pub fn push_front<T>(&mut self, buf: &mut Buffer<T>, value: T) {
        let key = insert(&mut buf.slab, Slot { value, next: None });

        match self.indices {
            Some(ref mut idxs) => {
                buf.slab[key as usize].next = Some(idxs.head);
                idxs.head = key;
            }
            None => {
                self.indices = Some(Indices {
                    head: key,
                    tail: key,
                });
            }
        }
    }

    pub fn pop_front<T>(&mut self, buf: &mut Buffer<T>) -> Option<T> {
        match self.indices {
            Some(mut idxs) => {
                let mut slot = buf.slab.remove(idxs.head as usize);
                if buf.slab.is_empty() {
                    // No deque holds a key any more: a connection with nothing queued keeps
                    // no frame slots.
                    buf.slab = Slab::new();
                }

                if idxs.head == idxs.tail {
                    assert!(slot.next.is_none());
                    self.indices = None;
                } else {
                    idxs.head = slot.next.take().unwrap();
                    self.indices = Some(idxs);
                }

                Some(slot.value)
            }
            None => None,
        }
    }
}
