// Koa 2.15 installed under an alias for the lowest-version test; its API is the one @types/koa describes.
declare module 'koa-2.15' {
  import Koa from 'koa';
  export default Koa;
}
