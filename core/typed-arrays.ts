// Tables indexed by id (counts, masks, flags) in typed arrays, grown as the
// ids do: at least doubled, so that growth stays rare.

type Table = Uint8Array | Int32Array | Uint32Array;

/** A table of `size` entries, of `table`'s kind, starting with its entries; the rest are `fill`. */
export function grown<T extends Table>(table: T, size: number, fill = 0): T {
  const bigger = new (table.constructor as new (length: number) => T)(size);
  if (fill !== 0) bigger.fill(fill);
  bigger.set(table);
  return bigger;
}

/** The size a table of `length` entries grows to so that index `id` fits. */
export function grownSize(id: number, length: number): number {
  return Math.max(id + 1, length * 2);
}
