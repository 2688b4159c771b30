/**
 * `instanceof` across copies of this package. An app can load both builds of `@idemkit/core` (a
 * CJS dependency `require`s it, ESM code `import`s it) or two installed versions, and each copy
 * has its own classes: `err instanceof KeyError` would be false for the other copy's `KeyError`.
 * Each branded class marks its prototype with a registry symbol (the same in every copy) holding
 * its name, and answers `instanceof` by that mark when the ordinary prototype check fails.
 */
const MARK = Symbol.for('@idemkit/core.errorClass');

type Branded = abstract new (...args: never[]) => Error;

function hasInstance(this: Branded, value: unknown): boolean {
  if (Function.prototype[Symbol.hasInstance].call(this, value)) return true;
  // Only the classes branded below: an app's own subclass has no mark of its own, and would
  // otherwise match any instance of the class it extends.
  if (!Object.hasOwn(this.prototype, MARK) || typeof value !== 'object' || value === null) return false;
  const name = (this.prototype as unknown as Record<symbol, unknown>)[MARK];
  for (let proto: unknown = Object.getPrototypeOf(value); proto !== null && typeof proto === 'object'; proto = Object.getPrototypeOf(proto)) {
    if (Object.hasOwn(proto, MARK) && (proto as Record<symbol, unknown>)[MARK] === name) return true;
  }
  return false;
}

/** Brand `classes` so `instanceof` holds for their instances from any copy of the package. */
export function brandErrorClasses(...classes: Branded[]): void {
  for (const cls of classes) {
    Object.defineProperty(cls.prototype, MARK, { value: cls.name });
    Object.defineProperty(cls, Symbol.hasInstance, { value: hasInstance, configurable: true });
  }
}
