package org.edgec.core

import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.util.zip.ZipFile

/** One array of a .npy file: its shape and its data as longs (int64) or floats (float32). */
class NpyArray(val shape: IntArray, val longs: LongArray? = null, val floats: FloatArray? = null) {
    val rows: Int get() = if (shape.isEmpty()) 1 else shape[0]
    val columns: Int get() = if (shape.size < 2) 1 else shape.drop(1).fold(1) { a, b -> a * b }

    fun row(i: Int): FloatArray = floats!!.copyOfRange(i * columns, (i + 1) * columns)
}

/**
 * Reads numpy's .npy format (version 1-3 headers) for the two dtypes golden.npz holds: little-endian int64
 * ('<i8') and float32 ('<f4'), C order. Anything else is refused with the dtype named, so a golden file
 * written by a future edgec fails loudly instead of being misread.
 */
object Npy {
    private val MAGIC = byteArrayOf(0x93.toByte(), 'N'.code.toByte(), 'U'.code.toByte(), 'M'.code.toByte(),
        'P'.code.toByte(), 'Y'.code.toByte())

    fun read(bytes: ByteArray, name: String = "array"): NpyArray {
        require(bytes.size >= 10 && bytes.copyOfRange(0, 6).contentEquals(MAGIC)) { "$name: not a .npy array" }
        val major = bytes[6].toInt()
        val buffer = ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN)
        val (headerLength, headerStart) = if (major == 1) buffer.getShort(8).toInt() and 0xffff to 10
            else buffer.getInt(8) to 12
        val header = String(bytes, headerStart, headerLength, Charsets.ISO_8859_1)
        val descr = Regex("'descr':\\s*'([^']+)'").find(header)?.groupValues?.get(1)
            ?: throw IllegalArgumentException("$name: .npy header without descr: $header")
        require(!Regex("'fortran_order':\\s*True").containsMatchIn(header)) { "$name: Fortran-ordered arrays are not supported" }
        val shapeText = Regex("'shape':\\s*\\(([^)]*)\\)").find(header)?.groupValues?.get(1)
            ?: throw IllegalArgumentException("$name: .npy header without shape: $header")
        val shape = shapeText.split(',').map { it.trim() }.filter { it.isNotEmpty() }.map { it.toInt() }.toIntArray()
        val count = shape.fold(1) { a, b -> a * b }
        val data = ByteBuffer.wrap(bytes, headerStart + headerLength, bytes.size - headerStart - headerLength)
            .slice().order(ByteOrder.LITTLE_ENDIAN)
        return when (descr) {
            "<i8" -> NpyArray(shape, longs = LongArray(count).also { data.asLongBuffer().get(it) })
            "<f4" -> NpyArray(shape, floats = FloatArray(count).also { data.asFloatBuffer().get(it) })
            else -> throw IllegalArgumentException("$name: dtype $descr; expected little-endian int64 or float32")
        }
    }

    /** Every array of a .npz (a zip of .npy files), by name without the .npy suffix. */
    fun readNpz(file: File): Map<String, NpyArray> = ZipFile(file).use { zip ->
        zip.entries().asSequence().filter { it.name.endsWith(".npy") }.associate { entry ->
            val name = entry.name.removeSuffix(".npy")
            name to read(zip.getInputStream(entry).readBytes(), "${file.name}:$name")
        }
    }
}

/** The reference's outputs a bundle carries (golden.npz): per prompt its ids, its logits at every prompt
 * position [positions, vocab], and its greedy tokens. */
class Golden(val prompts: List<LongArray>, val logits: List<NpyArray>, val tokens: List<LongArray>) {
    companion object {
        const val FILE = "golden.npz"

        fun load(file: File): Golden {
            val arrays = Npy.readNpz(file)
            val count = arrays.keys.count { it.startsWith("prompt_") }
            require(count > 0) { "${file.path}: no prompt_0 array; is this an edgec golden.npz?" }
            fun get(name: String) = arrays[name] ?: throw IllegalArgumentException("${file.path}: no $name array")
            return Golden(
                (0 until count).map { get("prompt_$it").longs!! },
                (0 until count).map { get("logits_$it") },
                (0 until count).map { get("tokens_$it").longs!! },
            )
        }
    }
}
