/**
 * A method name in upper case. Node's parser hands every standard method over in upper case
 * already, and `toUpperCase()` is a runtime call in V8 that allocates (~330 instructions under
 * callgrind, three times per request): such names are returned as they are.
 */
export function upperMethod(method: string): string {
  for (let i = 0; i < method.length; i++) {
    const c = method.charCodeAt(i);
    if ((c >= 0x61 && c <= 0x7a) || c > 0x7f) return method.toUpperCase();
  }
  return method;
}
