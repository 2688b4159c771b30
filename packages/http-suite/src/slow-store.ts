import { MemoryStore } from '@idemkit/core';

/** A memory store whose begin() answers `delayMs` after it claimed the key, as a slow or distant store does. */
export class SlowBeginStore extends MemoryStore {
  delayMs = 0;
  override async begin(...args: Parameters<MemoryStore['begin']>): ReturnType<MemoryStore['begin']> {
    const result = await super.begin(...args);
    if (this.delayMs > 0) await new Promise((resolve) => setTimeout(resolve, this.delayMs));
    return result;
  }
}
