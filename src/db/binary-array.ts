/**
 * bytea[] parameters in PostgreSQL's binary array format (array_send/array_recv).
 *
 * node-postgres sends a Buffer parameter in binary but renders an array of Buffers as
 * text: `\x` and two hex digits per byte, which Node builds and the server parses
 * again (byteain) for every element. A re-encryption batch sends two envelopes per row
 * (the new one and the expected one of the compare-and-swap), so the hex round trip
 * cost about as much as the AES-GCM work (bench, rotation section). Encoded here as one
 * Buffer, the parameter goes over the wire as is and the server reads it with a copy.
 * The SQL must name the type (`$n::bytea[]`): array_recv checks the element type.
 */

/** pg_type.oid of bytea. */
const BYTEA_OID = 17;

/**
 * One-dimensional bytea[] (lower bound 1) in binary format; null elements are SQL NULL.
 * Layout: ndim, has-nulls flag, element type, then per dimension its length and lower
 * bound, then per element a length (-1: NULL) and the bytes; all integers int32 big-endian.
 */
export function encodeByteaArray(values: readonly (Buffer | null | undefined)[]): Buffer {
  if (values.length === 0) {
    const empty = Buffer.alloc(12);
    empty.writeInt32BE(BYTEA_OID, 8); // ndim 0, no nulls
    return empty;
  }
  let size = 20;
  let nulls = 0;
  for (const v of values) {
    size += 4;
    if (v == null) nulls = 1;
    else size += v.length;
  }
  const out = Buffer.allocUnsafe(size);
  out.writeInt32BE(1, 0);
  out.writeInt32BE(nulls, 4);
  out.writeInt32BE(BYTEA_OID, 8);
  out.writeInt32BE(values.length, 12);
  out.writeInt32BE(1, 16);
  let at = 20;
  for (const v of values) {
    if (v == null) {
      out.writeInt32BE(-1, at);
      at += 4;
    } else {
      out.writeInt32BE(v.length, at);
      v.copy(out, at + 4);
      at += 4 + v.length;
    }
  }
  return out;
}
