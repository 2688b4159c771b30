// The `express4` alias (npm:express@^4) ships no types; its API is the subset the test app uses.
declare module 'express4' {
  import express from 'express';
  export default express;
}
