// Reads the samples of a 16-bit PCM WAV file: what a microphone would send.

export interface PcmS16 {
  sampleRateHz: number;
  channels: number;
  /** Interleaved signed 16-bit little-endian samples. */
  samples: Buffer;
}

export function readWavS16(file: Buffer): PcmS16 {
  if (file.length < 12 || file.toString("ascii", 0, 4) !== "RIFF" || file.toString("ascii", 8, 12) !== "WAVE") {
    throw new Error("not a WAV file (no RIFF/WAVE header)");
  }
  let format: { tag: number; channels: number; rate: number; bits: number } | undefined;
  let offset = 12;
  while (offset + 8 <= file.length) {
    const id = file.toString("ascii", offset, offset + 4);
    const size = file.readUInt32LE(offset + 4);
    const body = offset + 8;
    if (id === "fmt ") {
      format = {
        tag: file.readUInt16LE(body),
        channels: file.readUInt16LE(body + 2),
        rate: file.readUInt32LE(body + 4),
        bits: file.readUInt16LE(body + 14),
      };
    } else if (id === "data") {
      if (!format) throw new Error("WAV data chunk before its fmt chunk");
      // 0xFFFE is WAVE_FORMAT_EXTENSIBLE, used by some recorders for plain PCM.
      if ((format.tag !== 1 && format.tag !== 0xfffe) || format.bits !== 16) {
        throw new Error(`WAV must be 16-bit PCM (format tag ${format.tag}, ${format.bits} bits)`);
      }
      // Streaming writers leave the size at 0xFFFFFFFF: take what the file has.
      const end = Math.min(body + size, file.length);
      const frameBytes = 2 * format.channels;
      const samples = file.subarray(body, end - ((end - body) % frameBytes));
      return { sampleRateHz: format.rate, channels: format.channels, samples };
    }
    offset = body + size + (size % 2); // chunks are padded to an even length
  }
  throw new Error("WAV file has no data chunk");
}
