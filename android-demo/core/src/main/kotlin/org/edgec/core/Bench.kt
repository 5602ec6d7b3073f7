package org.edgec.core

import java.util.Random

/** runtimes/base.py BenchSpec: what one benchmark run measures. */
data class BenchSpec(
    val promptTokens: Int = 128, val newTokens: Int = 128, val warmup: Int = 1, val repeats: Int = 3,
    val threads: Int = 0, val seed: Int = 0, val depths: List<Int> = listOf(0),
) {
    init {
        require(promptTokens > 0 && newTokens > 0 && repeats > 0 && warmup >= 0) { "bench spec: token counts and repeats must be positive" }
        require(depths.isNotEmpty() && depths.all { it >= 0 } && depths.toSet().size == depths.size) {
            "depths ${depths.joinToString(",")}: expected distinct token counts >= 0" }
    }

    val maxTokens: Int get() = depths.max() + promptTokens + newTokens

    fun toJson(): Map<String, Any?> = linkedMapOf("prompt_tokens" to promptTokens, "new_tokens" to newTokens,
        "warmup" to warmup, "repeats" to repeats, "threads" to threads, "seed" to seed, "depths" to depths)
}

/** One depth's medians and samples: an entry of the edgec.bench/1 result's by_depth. */
data class DepthResult(val depth: Int, val prefill: List<Double>, val ttft: List<Double>, val decode: List<Double>, val spec: BenchSpec) {
    val prefillSeconds get() = Bench.median(prefill)
    val ttftSeconds get() = Bench.median(ttft)
    val prefillTokensPerSecond get() = spec.promptTokens / prefillSeconds
    val decodeTokensPerSecond get() = maxOf(spec.newTokens - 1, 1) / Bench.median(decode)

    fun toJson(): Map<String, Any?> = linkedMapOf("depth" to depth, "ttft_s" to ttftSeconds, "prefill_s" to prefillSeconds,
        "prefill_tokens_per_s" to prefillTokensPerSecond, "decode_tokens_per_s" to decodeTokensPerSecond,
        "samples" to samples())

    fun samples(): Map<String, Any?> = linkedMapOf("prefill_s" to prefill, "ttft_s" to ttft, "decode_s" to decode)
}

/** The benchmark of runtimes/base.py (bench_depths, bench_result) over an Engine, and its JSON. */
object Bench {
    const val SCHEMA = "edgec.bench/1"
    // The context before a timed run goes into the cache in chunks of this many tokens (runtimes/base.py).
    const val FILL_CHUNK = 256

    fun median(values: List<Double>): Double {
        if (values.isEmpty()) return Double.NaN
        val sorted = values.sorted()
        val mid = sorted.size / 2
        return if (sorted.size % 2 == 1) sorted[mid] else (sorted[mid - 1] + sorted[mid]) / 2
    }

    /** Timings of one greedy run: (prefill s, time to first token s, decode s). */
    fun timedGreedy(engine: Engine, prompt: LongArray, newTokens: Int, context: LongArray, clock: () -> Double): DoubleArray {
        var start = 0
        while (start < context.size) {  // untimed: the conversation so far
            val end = minOf(start + FILL_CHUNK, context.size)
            engine.step(context.copyOfRange(start, end), start)
            start = end
        }
        val started = clock()
        var logits = engine.step(prompt, context.size)
        val prefill = clock() - started
        var token = argmax(logits).toLong()
        val ttft = clock() - started
        val decodeStarted = clock()
        var position = context.size + prompt.size
        for (i in 1 until newTokens) {
            logits = engine.step(longArrayOf(token), position++)
            token = argmax(logits).toLong()
        }
        return doubleArrayOf(prefill, ttft, clock() - decodeStarted)
    }

    /** Measurements per depth on random prompt tokens (ids 3.., past the usual special tokens). */
    fun run(engine: Engine, spec: BenchSpec, vocabSize: Int, clock: () -> Double = { System.nanoTime() / 1e9 }): List<DepthResult> {
        val random = Random(spec.seed.toLong())
        val tokens = LongArray(spec.depths.max() + spec.promptTokens) { 3 + random.nextInt(vocabSize - 3).toLong() }
        val prompt = tokens.copyOfRange(0, spec.promptTokens)
        repeat(spec.warmup) { timedGreedy(engine, prompt, minOf(spec.newTokens, 8), LongArray(0), clock) }
        return spec.depths.map { depth ->
            val context = tokens.copyOfRange(spec.promptTokens, spec.promptTokens + depth)
            val runs = (0 until spec.repeats).map { timedGreedy(engine, prompt, spec.newTokens, context, clock) }
            DepthResult(depth, runs.map { it[0] }, runs.map { it[1] }, runs.map { it[2] }, spec)
        }
    }

    /** The edgec.bench/1 result (runtimes/base.py BenchResult): the first depth's medians at the top level,
     * every depth in by_depth. `edgec report` reads it like any device's. */
    fun resultJson(runtime: Map<String, Any?>, device: Map<String, Any?>, bundle: Map<String, Any?>, spec: BenchSpec,
                   loadSeconds: Double, byDepth: List<DepthResult>, peakRssMb: Double, artifactBytes: Long): Map<String, Any?> {
        val first = byDepth.first()
        return linkedMapOf(
            "runtime" to runtime, "device" to device, "bundle" to bundle, "spec" to spec.toJson(),
            "load_s" to loadSeconds, "ttft_s" to first.ttftSeconds, "prefill_s" to first.prefillSeconds,
            "prefill_tokens_per_s" to first.prefillTokensPerSecond, "decode_tokens_per_s" to first.decodeTokensPerSecond,
            "peak_rss_mb" to peakRssMb, "artifact_bytes" to artifactBytes, "samples" to first.samples(),
            "by_depth" to byDepth.map { it.toJson() }, "schema" to SCHEMA,
        )
    }

    /** Parses the device's /proc/self/status VmHWM (kB) line: the peak resident set, as the host agent reports it. */
    fun peakRssMb(procStatus: String): Double =
        procStatus.lineSequence().firstOrNull { it.startsWith("VmHWM:") }?.split(Regex("\\s+"))?.get(1)?.toDouble()?.div(1024) ?: Double.NaN
}
