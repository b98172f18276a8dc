"""Facts about text shared by the cleaning steps and near-duplicate detection."""

from __future__ import annotations

import numpy as np

# Languages written without spaces between words: the quality filters count characters as words there
# (ROOTS tokenised Chinese instead), and MinHash shingles characters instead of words.
NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "km", "my", "bo"})

# The 64-bit FNV prime, the base of the polynomial hashes over code points: odd (so invertible mod
# 2**64, which rolling hashes need), large, and it mixes code points well.
POLYNOMIAL_HASH_BASE = np.uint64(0x100000001B3)
