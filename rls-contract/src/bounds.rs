//! Which numbers must a request stay within?
//!
//! The service refuses (gRPC `INVALID_ARGUMENT`) or clamps what is beyond
//! these; a caller that stays within them never meets either.

/// Limits and hits above 2^53 - 1 cannot be counted exactly by the service
/// (its Redis Lua numbers are doubles): larger limits are clamped to it,
/// larger hits are refused.
pub const MAX_EXACT: u64 = (1 << 53) - 1;

/// Upper bound on descriptors per request (a defence, far above real use).
pub const MAX_DESCRIPTORS: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_exact_is_the_largest_integer_a_double_holds_exactly() {
        assert_eq!(MAX_EXACT, 9_007_199_254_740_991);
        assert_eq!(MAX_EXACT as f64 as u64, MAX_EXACT);
        assert_eq!((MAX_EXACT + 2) as f64 as u64, MAX_EXACT + 1);
    }
}
