'use strict';
// Test strings: fixed edge cases plus seeded random Unicode (same strings every run).

const FIXED = [
  'Hello, world!',
  'the other one went there',
  '',
  ' ',
  '   leading and trailing   ',
  'tabs\tand\nnewlines\r\n\n',
  '你好，世界',
  'こんにちは 世界',
  'emoji 🙂🚀👩‍👩‍👧 flags 🇫🇷',
  'accents: café naïve Ångström',
  'math ∑∫√ ≠ ≤',
  '<s> looks special but is text? </s>',
  'numbers 1234567890 3.14159',
  'a'.repeat(300),
];

const RANGES = [
  [0x20, 0x7e], // ASCII
  [0xa0, 0x24f], // Latin-1 + extended
  [0x370, 0x3ff], // Greek
  [0x400, 0x4ff], // Cyrillic
  [0x4e00, 0x4fff], // CJK
  [0x3040, 0x30ff], // kana
  [0x1f300, 0x1f64f], // emoji (astral: surrogate pairs in JS)
];
const WHITESPACE = [' ', '  ', '\t', '\n', '   '];

/** mulberry32: a tiny seeded PRNG so the corpus is reproducible. */
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * @param {number} count
 * @param {number} seed
 * @returns {string[]}
 */
function randomStrings(count, seed = 42) {
  const rand = rng(seed);
  const out = [];
  for (let i = 0; i < count; i++) {
    let s = '';
    const len = 1 + Math.floor(rand() * 24);
    for (let j = 0; j < len; j++) {
      if (rand() < 0.15) {
        s += WHITESPACE[Math.floor(rand() * WHITESPACE.length)];
        continue;
      }
      const [lo, hi] = RANGES[Math.floor(rand() * RANGES.length)];
      s += String.fromCodePoint(lo + Math.floor(rand() * (hi - lo + 1)));
    }
    out.push(s);
  }
  return out;
}

/**
 * Random id sequences over the whole vocabulary (special tokens and stray bytes included).
 * @param {number} count
 * @param {number} vocabSize
 * @param {number} seed
 * @returns {number[][]}
 */
function randomIdSequences(count, vocabSize, seed = 7) {
  const rand = rng(seed);
  return Array.from({ length: count }, () =>
    Array.from({ length: Math.floor(rand() * 16) }, () => Math.floor(rand() * vocabSize)),
  );
}

module.exports = { FIXED, randomStrings, randomIdSequences, rng };
