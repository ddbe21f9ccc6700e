//! CRC32C combination in O(log n) with a precomputed table.
//!
//! `crc32c::crc32c_combine` (crate 0.6) uses zlib's old matrix method, which costs more per
//! call than checksumming a 100 KB batch; the log calls this twice per append. This is zlib
//! 1.2.12's method (`multmodp` and a table of x^(2^k) mod P), specialised to the Castagnoli
//! polynomial, computed at compile time.

/// The reflected Castagnoli polynomial.
const POLY: u32 = 0x82f6_3b78;

/// a(x) * b(x) modulo P(x), bits reflected (x^0 is the high bit).
const fn multmodp(a: u32, mut b: u32) -> u32 {
    let mut m: u32 = 1 << 31;
    let mut p: u32 = 0;
    loop {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
                break;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
    p
}

/// X2N[k] = x^(2^k) mod P(x).
const X2N: [u32; 32] = {
    let mut t = [0u32; 32];
    let mut p: u32 = 1 << 30; // x^1
    t[0] = p;
    let mut n = 1;
    while n < 32 {
        p = multmodp(p, p);
        t[n] = p;
        n += 1;
    }
    t
};

/// x^(n * 2^k) mod P(x).
fn x2nmodp(mut n: u64, mut k: usize) -> u32 {
    let mut p: u32 = 1 << 31; // x^0
    while n != 0 {
        if n & 1 != 0 {
            p = multmodp(X2N[k & 31], p);
        }
        n >>= 1;
        k += 1;
    }
    p
}

/// The CRC32C of `A || B` from `crc(A)`, `crc(B)` and `len(B)`.
pub(crate) fn combine(crc_a: u32, crc_b: u32, len_b: usize) -> u32 {
    multmodp(x2nmodp(len_b as u64, 3), crc_a) ^ crc_b
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::combine;

    proptest! {
        #[test]
        fn matches_direct_computation(a in proptest::collection::vec(any::<u8>(), 0..300), b in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let whole: Vec<u8> = a.iter().chain(&b).copied().collect();
            prop_assert_eq!(combine(crc32c::crc32c(&a), crc32c::crc32c(&b), b.len()), crc32c::crc32c(&whole));
            prop_assert_eq!(combine(crc32c::crc32c(&a), crc32c::crc32c(&b), b.len()), crc32c::crc32c_combine(crc32c::crc32c(&a), crc32c::crc32c(&b), b.len()));
        }
    }
}
