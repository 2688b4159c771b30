// Koa 2.15 and 2.16 installed under aliases for the Koa 2 tests; their API is the one @types/koa describes.
declare module 'koa-2.15' {
  import Koa from 'koa';
  export default Koa;
}
declare module 'koa-2.16' {
  import Koa from 'koa';
  export default Koa;
}
