//! Page contents shared by the page and stream benchmarks.

/// Pseudo-random bytes (xorshift), incompressible.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Pages that look like kernel or heap memory (zstd gets some 3-4x out of them).
pub fn typical(len: usize, seed: u64) -> Vec<u8> {
    let n = noise(len, seed);
    let mut p = vec![0u8; len];
    for (i, chunk) in p.chunks_mut(64).enumerate() {
        match i % 4 {
            0 => chunk.copy_from_slice(&n[i * 64..i * 64 + 64]),
            1 => chunk
                .iter_mut()
                .zip(
                    b"struct task_struct { pid, comm, mm, files } "
                        .iter()
                        .cycle(),
                )
                .for_each(|(d, s)| *d = *s),
            2 => {
                for (j, w) in chunk.chunks_mut(8).enumerate() {
                    w.copy_from_slice(
                        &(0xffff_8880_0000_0000u64 + (i * 8 + j) as u64 * 64).to_le_bytes(),
                    );
                }
            }
            _ => {}
        }
    }
    p
}
