//! A dense bitset with one bit per guest page.
//!
//! Everything that tracks pages in this workspace (dirty pages between pre-copy passes,
//! pages a post-copy destination has received, NBD blocks a mirror still has to copy) is
//! a [`DirtyBitmap`]. The layout is the one KVM uses for `KVM_GET_DIRTY_LOG`: little-endian
//! 64-bit words, bit `i % 64` of word `i / 64` stands for page `i`, so a KVM log can be
//! merged in without reshuffling bits.
//!
//! Scans skip clean memory eight words at a time, so a sparse bitmap is read at close to
//! memory bandwidth (see `benches/bitmap.rs`).

use std::ops::Range;

const WORD_BITS: usize = 64;
/// Words tested together when skipping clean stretches: 256 bytes, four cache lines.
const SCAN_CHUNK: usize = 32;

/// A fixed-length bitset with one bit per page.
///
/// Bits past `len()` in the last word are always zero: every operation that could set them
/// masks them off, so `count()` and the iterators never see phantom pages.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    len: usize,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("len", &self.len)
            .field("count", &self.count())
            .finish()
    }
}

/// Number of 64-bit words needed for `bits` bits.
#[inline]
pub const fn words_for(bits: usize) -> usize {
    bits.div_ceil(WORD_BITS)
}

impl DirtyBitmap {
    /// A bitmap of `len` pages, all clear.
    pub fn new(len: usize) -> Self {
        DirtyBitmap {
            words: vec![0; words_for(len)],
            len,
        }
    }

    /// A bitmap of `len` pages, all set.
    pub fn new_full(len: usize) -> Self {
        let mut b = DirtyBitmap {
            words: vec![u64::MAX; words_for(len)],
            len,
        };
        b.mask_tail();
        b
    }

    /// Builds a bitmap from raw words in KVM's layout. Bits past `len` are cleared.
    ///
    /// Returns `None` when `words` is not exactly `words_for(len)` long.
    pub fn from_words(words: Vec<u64>, len: usize) -> Option<Self> {
        if words.len() != words_for(len) {
            return None;
        }
        let mut b = DirtyBitmap { words, len };
        b.mask_tail();
        Some(b)
    }

    #[inline]
    fn mask_tail(&mut self) {
        let rem = self.len % WORD_BITS;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    /// Number of pages (bits) the bitmap covers.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the bitmap covers no page at all.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The underlying words, in KVM's dirty-log layout.
    #[inline]
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    #[inline]
    fn check(&self, page: usize) {
        assert!(
            page < self.len,
            "page {page} out of range for a bitmap of {} pages",
            self.len
        );
    }

    /// Marks `page`.
    ///
    /// # Panics
    /// If `page >= len()`.
    #[inline]
    pub fn set(&mut self, page: usize) {
        self.check(page);
        self.words[page / WORD_BITS] |= 1 << (page % WORD_BITS);
    }

    /// Clears `page`.
    ///
    /// # Panics
    /// If `page >= len()`.
    #[inline]
    pub fn clear(&mut self, page: usize) {
        self.check(page);
        self.words[page / WORD_BITS] &= !(1 << (page % WORD_BITS));
    }

    /// Whether `page` is marked. Pages past the end read as clear.
    #[inline]
    pub fn test(&self, page: usize) -> bool {
        page < self.len && self.words[page / WORD_BITS] & (1 << (page % WORD_BITS)) != 0
    }

    /// Marks `page` and says whether it was clear before.
    ///
    /// # Panics
    /// If `page >= len()`.
    #[inline]
    pub fn test_and_set(&mut self, page: usize) -> bool {
        self.check(page);
        let w = &mut self.words[page / WORD_BITS];
        let bit = 1 << (page % WORD_BITS);
        let was_clear = *w & bit == 0;
        *w |= bit;
        was_clear
    }

    fn apply_range(&mut self, range: Range<usize>, set: bool) {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "range {range:?} out of bounds for a bitmap of {} pages",
            self.len
        );
        if range.is_empty() {
            return;
        }
        let (first, last) = (range.start / WORD_BITS, (range.end - 1) / WORD_BITS);
        let head = u64::MAX << (range.start % WORD_BITS);
        let tail = u64::MAX >> (WORD_BITS - 1 - (range.end - 1) % WORD_BITS);
        let op = |w: &mut u64, m: u64| {
            if set { *w |= m } else { *w &= !m }
        };
        if first == last {
            op(&mut self.words[first], head & tail);
            return;
        }
        op(&mut self.words[first], head);
        for w in &mut self.words[first + 1..last] {
            op(w, u64::MAX);
        }
        op(&mut self.words[last], tail);
    }

    /// Marks every page in `range`.
    ///
    /// # Panics
    /// If the range reaches past `len()`.
    pub fn set_range(&mut self, range: Range<usize>) {
        self.apply_range(range, true);
    }

    /// Clears every page in `range`.
    ///
    /// # Panics
    /// If the range reaches past `len()`.
    pub fn clear_range(&mut self, range: Range<usize>) {
        self.apply_range(range, false);
    }

    /// Clears every page.
    pub fn clear_all(&mut self) {
        self.words.fill(0);
    }

    /// Marks every page.
    pub fn set_all(&mut self) {
        self.words.fill(u64::MAX);
        self.mask_tail();
    }

    /// Number of marked pages.
    pub fn count(&self) -> usize {
        // Skip clean stretches eight words at a time: popcount is not vectorised on the
        // baseline x86-64 target, the OR is.
        let mut chunks = self.words.chunks_exact(8);
        let mut n = 0usize;
        for chunk in &mut chunks {
            if chunk.iter().fold(0u64, |acc, &w| acc | w) != 0 {
                n += chunk.iter().map(|w| w.count_ones() as usize).sum::<usize>();
            }
        }
        n + chunks
            .remainder()
            .iter()
            .map(|w| w.count_ones() as usize)
            .sum::<usize>()
    }

    /// Number of marked pages in `range` (clamped to the bitmap).
    pub fn count_range(&self, range: Range<usize>) -> usize {
        self.iter_runs_in(range).map(|r| r.len()).sum()
    }

    /// True when no page is marked.
    pub fn is_clear(&self) -> bool {
        self.next_nonzero_word(0).is_none()
    }

    fn assert_same_len(&self, other: &DirtyBitmap) {
        assert_eq!(
            self.len, other.len,
            "bitmaps of different lengths ({} and {} pages)",
            self.len, other.len
        );
    }

    /// `self |= other`.
    ///
    /// # Panics
    /// If the two bitmaps differ in length.
    pub fn union_with(&mut self, other: &DirtyBitmap) {
        self.assert_same_len(other);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// `self &= other`.
    ///
    /// # Panics
    /// If the two bitmaps differ in length.
    pub fn intersect_with(&mut self, other: &DirtyBitmap) {
        self.assert_same_len(other);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= *b;
        }
    }

    /// `self &= !other`: clears every page marked in `other`.
    ///
    /// # Panics
    /// If the two bitmaps differ in length.
    pub fn subtract(&mut self, other: &DirtyBitmap) {
        self.assert_same_len(other);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !*b;
        }
    }

    /// ORs `nbits` bits of `src` (KVM layout, bit 0 of `src[0]` first) into the bitmap
    /// starting at page `at`. This is how a per-memory-slot KVM dirty log lands in the
    /// bitmap of all of guest RAM, whose slots need not start on a word boundary.
    ///
    /// # Panics
    /// If `at + nbits` reaches past `len()` or `src` holds fewer than `nbits` bits.
    pub fn or_bits_at(&mut self, at: usize, src: &[u64], nbits: usize) {
        assert!(
            at.checked_add(nbits).is_some_and(|end| end <= self.len),
            "{nbits} bits at page {at} do not fit a bitmap of {} pages",
            self.len
        );
        assert!(
            src.len() >= words_for(nbits),
            "source holds fewer than {nbits} bits"
        );
        if nbits == 0 {
            return;
        }
        let nwords = words_for(nbits);
        let rem = nbits % WORD_BITS;
        let last_mask = if rem == 0 {
            u64::MAX
        } else {
            (1u64 << rem) - 1
        };
        let shift = at % WORD_BITS;
        let base = at / WORD_BITS;
        for (i, &w) in src[..nwords].iter().enumerate() {
            let w = if i + 1 == nwords { w & last_mask } else { w };
            if w == 0 {
                continue;
            }
            if shift == 0 {
                self.words[base + i] |= w;
            } else {
                self.words[base + i] |= w << shift;
                let carry = w >> (WORD_BITS - shift);
                if carry != 0 {
                    self.words[base + i + 1] |= carry;
                }
            }
        }
    }

    /// Moves the marked pages into `into` (its previous contents are discarded) and leaves
    /// this bitmap clear, without allocating: the sync step of a tracker hands its pages
    /// over this way once per pass.
    ///
    /// # Panics
    /// If the two bitmaps differ in length.
    pub fn drain_into(&mut self, into: &mut DirtyBitmap) {
        self.assert_same_len(into);
        std::mem::swap(&mut self.words, &mut into.words);
        self.clear_all();
    }

    /// Index of the first word at or after `from` that is not zero.
    ///
    /// Clean stretches are tested `SCAN_CHUNK` words at a time with an OR the compiler
    /// vectorises, so a clean bitmap is scanned at memory speed.
    #[inline]
    fn next_nonzero_word(&self, from: usize) -> Option<usize> {
        let words = self.words.get(from..)?;
        let mut chunks = words.chunks_exact(SCAN_CHUNK);
        let mut base = from;
        for chunk in &mut chunks {
            if chunk.iter().fold(0u64, |acc, &w| acc | w) != 0 {
                break;
            }
            base += SCAN_CHUNK;
        }
        self.words[base..]
            .iter()
            .position(|&w| w != 0)
            .map(|p| base + p)
    }

    /// Index of the first word at or after `from` that is not all ones.
    #[inline]
    fn next_nonfull_word(&self, from: usize) -> Option<usize> {
        let words = self.words.get(from..)?;
        let mut chunks = words.chunks_exact(8);
        let mut base = from;
        for chunk in &mut chunks {
            let all = chunk.iter().fold(u64::MAX, |acc, &w| acc & w);
            if all != u64::MAX {
                return chunk.iter().position(|&w| w != u64::MAX).map(|p| base + p);
            }
            base += 8;
        }
        chunks
            .remainder()
            .iter()
            .position(|&w| w != u64::MAX)
            .map(|p| base + p)
    }

    /// First marked page at or after `from`.
    pub fn next_set(&self, from: usize) -> Option<usize> {
        if from >= self.len {
            return None;
        }
        let wi = from / WORD_BITS;
        let w = self.words[wi] & (u64::MAX << (from % WORD_BITS));
        if w != 0 {
            return Some(wi * WORD_BITS + w.trailing_zeros() as usize);
        }
        let wi = self.next_nonzero_word(wi + 1)?;
        Some(wi * WORD_BITS + self.words[wi].trailing_zeros() as usize)
    }

    /// First clear page at or after `from` (or `len()` if there is none).
    pub fn next_clear(&self, from: usize) -> usize {
        if from >= self.len {
            return self.len;
        }
        let wi = from / WORD_BITS;
        let w = !self.words[wi] & (u64::MAX << (from % WORD_BITS));
        let found = if w != 0 {
            wi * WORD_BITS + w.trailing_zeros() as usize
        } else {
            match self.next_nonfull_word(wi + 1) {
                Some(wi) => wi * WORD_BITS + (!self.words[wi]).trailing_zeros() as usize,
                None => self.len,
            }
        };
        found.min(self.len)
    }

    /// Iterates the marked pages in ascending order.
    pub fn iter_ones(&self) -> Ones<'_> {
        Ones {
            bitmap: self,
            word_index: 0,
            current: self.words.first().copied().unwrap_or(0),
        }
    }

    /// Iterates `(word_index, word)` for every word that is not zero: the fastest way to
    /// walk a sparse bitmap when the caller handles 64 pages at a time.
    pub fn iter_words(&self) -> NonZeroWords<'_> {
        NonZeroWords {
            bitmap: self,
            next: 0,
        }
    }

    /// Iterates maximal runs of consecutive marked pages, in ascending order.
    pub fn iter_runs(&self) -> Runs<'_> {
        self.iter_runs_in(0..self.len)
    }

    /// Iterates maximal runs of marked pages that lie within `range` (clamped to the
    /// bitmap), cut at the range's ends.
    pub fn iter_runs_in(&self, range: Range<usize>) -> Runs<'_> {
        let end = range.end.min(self.len);
        Runs {
            bitmap: self,
            pos: range.start.min(end),
            end,
        }
    }
}

/// Iterator over marked pages; see [`DirtyBitmap::iter_ones`].
pub struct Ones<'a> {
    bitmap: &'a DirtyBitmap,
    word_index: usize,
    current: u64,
}

impl Iterator for Ones<'_> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        loop {
            if self.current != 0 {
                let bit = self.current.trailing_zeros() as usize;
                // Clear the lowest set bit.
                self.current &= self.current - 1;
                return Some(self.word_index * WORD_BITS + bit);
            }
            let next = self.bitmap.next_nonzero_word(self.word_index + 1)?;
            self.word_index = next;
            self.current = self.bitmap.words[next];
        }
    }
}

/// Iterator over non-zero words; see [`DirtyBitmap::iter_words`].
pub struct NonZeroWords<'a> {
    bitmap: &'a DirtyBitmap,
    next: usize,
}

impl Iterator for NonZeroWords<'_> {
    type Item = (usize, u64);

    #[inline]
    fn next(&mut self) -> Option<(usize, u64)> {
        let wi = self.bitmap.next_nonzero_word(self.next)?;
        self.next = wi + 1;
        Some((wi, self.bitmap.words[wi]))
    }
}

/// Iterator over runs of marked pages; see [`DirtyBitmap::iter_runs`].
pub struct Runs<'a> {
    bitmap: &'a DirtyBitmap,
    pos: usize,
    end: usize,
}

impl Iterator for Runs<'_> {
    type Item = Range<usize>;

    #[inline]
    fn next(&mut self) -> Option<Range<usize>> {
        if self.pos >= self.end {
            return None;
        }
        let start = self.bitmap.next_set(self.pos)?;
        if start >= self.end {
            self.pos = self.end;
            return None;
        }
        let stop = self.bitmap.next_clear(start).min(self.end);
        self.pos = stop;
        Some(start..stop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[derive(Debug, Clone)]
    enum Op {
        Set(usize),
        Clear(usize),
        SetRange(usize, usize),
        ClearRange(usize, usize),
        OrBits(usize, Vec<u64>, usize),
        ClearAll,
        SetAll,
    }

    fn op(len: usize) -> impl Strategy<Value = Op> {
        let l = len.max(1);
        prop_oneof![
            (0..l).prop_map(Op::Set),
            (0..l).prop_map(Op::Clear),
            (0..=len, 0..=len).prop_map(|(a, b)| Op::SetRange(a.min(b), a.max(b))),
            (0..=len, 0..=len).prop_map(|(a, b)| Op::ClearRange(a.min(b), a.max(b))),
            (0..=len, proptest::collection::vec(any::<u64>(), 0..6)).prop_map(move |(at, src)| {
                let nbits = (src.len() * 64).min(len - at.min(len));
                Op::OrBits(at.min(len), src, nbits)
            }),
            Just(Op::ClearAll),
            Just(Op::SetAll),
        ]
    }

    fn apply(b: &mut DirtyBitmap, m: &mut BTreeSet<usize>, op: &Op) {
        match *op {
            Op::Set(p) if p < b.len() => {
                b.set(p);
                m.insert(p);
            }
            Op::Clear(p) if p < b.len() => {
                b.clear(p);
                m.remove(&p);
            }
            Op::Set(_) | Op::Clear(_) => {}
            Op::SetRange(s, e) => {
                b.set_range(s..e);
                m.extend(s..e);
            }
            Op::ClearRange(s, e) => {
                b.clear_range(s..e);
                for p in s..e {
                    m.remove(&p);
                }
            }
            Op::OrBits(at, ref src, nbits) => {
                b.or_bits_at(at, src, nbits);
                for i in 0..nbits {
                    if src[i / 64] >> (i % 64) & 1 == 1 {
                        m.insert(at + i);
                    }
                }
            }
            Op::ClearAll => {
                b.clear_all();
                m.clear();
            }
            Op::SetAll => {
                b.set_all();
                m.extend(0..b.len());
            }
        }
    }

    fn runs_of(m: &BTreeSet<usize>) -> Vec<Range<usize>> {
        let mut out: Vec<Range<usize>> = Vec::new();
        for &p in m {
            match out.last_mut() {
                Some(r) if r.end == p => r.end = p + 1,
                _ => out.push(p..p + 1),
            }
        }
        out
    }

    fn check_against(b: &DirtyBitmap, m: &BTreeSet<usize>) -> Result<(), TestCaseError> {
        prop_assert_eq!(b.count(), m.len());
        prop_assert_eq!(
            b.iter_ones().collect::<Vec<_>>(),
            m.iter().copied().collect::<Vec<_>>()
        );
        prop_assert_eq!(b.iter_runs().collect::<Vec<_>>(), runs_of(m));
        prop_assert_eq!(b.is_clear(), m.is_empty());
        for p in 0..b.len() + 3 {
            prop_assert_eq!(b.test(p), m.contains(&p), "page {}", p);
        }
        let from_words: Vec<usize> = b
            .iter_words()
            .flat_map(|(wi, w)| {
                (0..64)
                    .filter(move |i| w >> i & 1 == 1)
                    .map(move |i| wi * 64 + i)
            })
            .collect();
        prop_assert_eq!(from_words, m.iter().copied().collect::<Vec<_>>());
        Ok(())
    }

    proptest! {
        #[test]
        fn matches_reference_model(
            (len, ops) in (0usize..700).prop_flat_map(|len| (Just(len), proptest::collection::vec(op(len), 0..40)))
        ) {
            let mut b = DirtyBitmap::new(len);
            let mut m = BTreeSet::new();
            for o in &ops {
                apply(&mut b, &mut m, o);
                check_against(&b, &m)?;
            }
        }

        #[test]
        fn set_operations_match_reference(
            (len, a, c) in (1usize..600).prop_flat_map(|len| (
                Just(len),
                proptest::collection::btree_set(0..len, 0..200),
                proptest::collection::btree_set(0..len, 0..200),
            ))
        ) {
            let mk = |s: &BTreeSet<usize>| {
                let mut b = DirtyBitmap::new(len);
                s.iter().for_each(|&p| b.set(p));
                b
            };
            let (ba, bc) = (mk(&a), mk(&c));
            let mut u = ba.clone();
            u.union_with(&bc);
            check_against(&u, &a.union(&c).copied().collect())?;
            let mut i = ba.clone();
            i.intersect_with(&bc);
            check_against(&i, &a.intersection(&c).copied().collect())?;
            let mut d = ba.clone();
            d.subtract(&bc);
            check_against(&d, &a.difference(&c).copied().collect())?;
            for start in [0, len / 3, len / 2] {
                for end in [len / 2, len, len + 5] {
                    let want = a.iter().filter(|&&p| p >= start && p < end).count();
                    prop_assert_eq!(ba.count_range(start..end), want);
                    let runs: Vec<_> = ba.iter_runs_in(start..end).collect();
                    let clipped: BTreeSet<usize> = a.iter().copied().filter(|&p| p >= start && p < end).collect();
                    prop_assert_eq!(runs, runs_of(&clipped));
                }
            }
        }

        #[test]
        fn next_set_and_next_clear(
            (len, a, from) in (1usize..600).prop_flat_map(|len| (
                Just(len),
                proptest::collection::btree_set(0..len, 0..len),
                0..len + 2,
            ))
        ) {
            let mut b = DirtyBitmap::new(len);
            a.iter().for_each(|&p| b.set(p));
            prop_assert_eq!(b.next_set(from), a.range(from..).next().copied());
            let want_clear = (from..len).find(|p| !a.contains(p)).unwrap_or(len);
            prop_assert_eq!(b.next_clear(from), want_clear.max(from.min(len)));
        }
    }

    #[test]
    fn tail_bits_never_leak() {
        let mut b = DirtyBitmap::new_full(70);
        assert_eq!(b.count(), 70);
        b.set_all();
        assert_eq!(b.count(), 70);
        let b = DirtyBitmap::from_words(vec![u64::MAX, u64::MAX], 70).unwrap();
        assert_eq!(b.count(), 70);
        assert_eq!(b.iter_runs().collect::<Vec<_>>(), vec![0..70]);
        assert!(DirtyBitmap::from_words(vec![0; 3], 70).is_none());
    }

    #[test]
    fn drain_leaves_source_clear() {
        let mut a = DirtyBitmap::new(200);
        a.set(3);
        a.set(199);
        let mut into = DirtyBitmap::new(200);
        into.set(50);
        a.drain_into(&mut into);
        assert!(a.is_clear());
        assert_eq!(into.iter_ones().collect::<Vec<_>>(), vec![3, 199]);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn set_past_end_panics() {
        DirtyBitmap::new(10).set(10);
    }
}
