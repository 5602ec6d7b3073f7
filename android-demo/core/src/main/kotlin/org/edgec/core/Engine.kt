package org.edgec.core

/**
 * A bundle's artifact loaded in a runtime, at the level of token ids: what the self-test and the benchmark
 * drive. The app implements it over ExecuTorch's Module (.pte) and ONNX Runtime (ONNX); the tests over
 * recorded logits.
 */
interface Engine : AutoCloseable {
    val name: String
    val version: String

    /** Writes `ids` at positions start.. of the KV cache (start 0 begins a fresh sequence) and returns the
     * last position's logits [vocab]. */
    fun step(ids: LongArray, start: Int): FloatArray

    /** The logits at every position of `ids` [ids.size][vocab]. By default one token at a time (a .pte
     * returns the last position only); an engine that has all positions at once overrides it. */
    fun forwardAll(ids: LongArray, start: Int): Array<FloatArray> =
        Array(ids.size) { i -> step(longArrayOf(ids[i]), start + i) }

    /** Greedy decoding on a fresh cache: `newTokens` ids (fewer when an EOS id comes). */
    fun greedy(prompt: LongArray, newTokens: Int, eosIds: Set<Long> = emptySet()): LongArray {
        val out = ArrayList<Long>()
        var logits = step(prompt, 0)
        var position = prompt.size
        while (true) {
            out.add(argmax(logits).toLong())
            if (out.size >= newTokens || out.last() in eosIds) break
            logits = step(longArrayOf(out.last()), position++)
        }
        return out.toLongArray()
    }

    override fun close() {}
}

/** A text-level engine for chat: streams decoded pieces as they come. */
interface ChatEngine : AutoCloseable {
    fun generate(prompt: String, maxNewTokens: Int, onPiece: (String) -> Unit): GenerationStats

    /** Stop a generate() running on another thread. */
    fun stop() {}

    override fun close() {}
}

data class GenerationStats(val promptTokens: Int, val newTokens: Int, val ttftSeconds: Double, val decodeSeconds: Double) {
    /** Decode speed as edgec bench reports it: the tokens after the first over the time after it. */
    val decodeTokensPerSecond: Double
        get() = if (decodeSeconds > 0) maxOf(newTokens - 1, 1) / decodeSeconds else Double.NaN
}

fun argmax(values: FloatArray): Int {
    var best = 0
    for (i in 1 until values.size) if (values[i] > values[best]) best = i  // first of ties, as numpy's argmax
    return best
}
