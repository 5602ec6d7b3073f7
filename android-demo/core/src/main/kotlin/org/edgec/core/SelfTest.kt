package org.edgec.core

import java.math.BigDecimal
import java.math.MathContext
import java.math.RoundingMode
import kotlin.math.exp
import kotlin.math.ln
import kotlin.math.max
import kotlin.math.sqrt

/**
 * The self-test: an engine against the bundle's golden data, the same metrics as edgec's
 * runtimes/validation.py (compare) and the same gates as compiler/validate.py (gate_results), so a
 * verdict on the phone means what `edgec validate` means.
 */
object SelfTest {
    /** compiler/config.py DEFAULT_GATES: metric -> (direction, limit). */
    val DEFAULT_GATES: Map<String, Map<String, Pair<String, Double>>> = mapOf(
        "fp32" to linkedMapOf(
            "max_abs_logits" to ("max" to 1e-3), "rel_l2_logits" to ("max" to 1e-4),
            "top1_agreement" to ("min" to 0.99), "kl_mean" to ("max" to 1e-5), "greedy_match" to ("min" to 1.0),
            "perplexity_ratio" to ("max" to 1.001), "lora_delta_retention" to ("min" to 0.99),
        ),
        "int4" to linkedMapOf(
            "kl_mean" to ("max" to 0.1), "top1_agreement" to ("min" to 0.8), "perplexity_ratio" to ("max" to 1.25),
            "lora_delta_retention" to ("min" to 0.7),
        ),
    )

    /** The gates for a precision with the build's overrides (manifest build_config.validation.gate_overrides). */
    fun gates(precision: String, overrides: Map<String, Double> = emptyMap()): Map<String, Pair<String, Double>> {
        val gates = LinkedHashMap(DEFAULT_GATES[precision]
            ?: throw IllegalArgumentException("precision $precision: no gates (known: ${DEFAULT_GATES.keys})"))
        for ((name, limit) in overrides) gates[name]?.let { gates[name] = it.first to limit }
        return gates
    }

    fun gateOverrides(manifest: Manifest): Map<String, Double> {
        val validation = (manifest.json["build_config"] as? Map<*, *>)?.get("validation") as? Map<*, *>
        val overrides = validation?.get("gate_overrides") as? Map<*, *> ?: return emptyMap()
        return overrides.entries.associate { (k, v) -> k.toString() to (v as Number).toDouble() }
    }

    fun logSoftmax(row: FloatArray): DoubleArray {
        var top = Double.NEGATIVE_INFINITY
        for (v in row) top = max(top, v.toDouble())
        var sum = 0.0
        for (v in row) sum += exp(v - top)
        val logSum = ln(sum)
        return DoubleArray(row.size) { row[it] - top - logSum }
    }

    /** Metrics over [positions][vocab] logits (runtimes/validation.py logit_metrics). */
    fun logitMetrics(reference: Array<FloatArray>, artifact: Array<FloatArray>): MutableMap<String, Any?> {
        require(reference.size == artifact.size) { "${artifact.size} positions of logits, the reference has ${reference.size}" }
        var maxAbs = 0.0; var diffSq = 0.0; var refSq = 0.0; var agree = 0
        val kl = DoubleArray(reference.size)
        val last = reference.size - 1
        var maxAbsLast = 0.0; var diffSqLast = 0.0; var refSqLast = 0.0
        for (p in reference.indices) {
            val ref = reference[p]; val art = artifact[p]
            require(ref.size == art.size) { "vocab ${art.size}, the reference has ${ref.size}" }
            for (v in ref.indices) {
                val d = Math.abs(art[v].toDouble() - ref[v].toDouble())
                maxAbs = max(maxAbs, d); diffSq += d * d; refSq += ref[v].toDouble() * ref[v]
                if (p == last) { maxAbsLast = max(maxAbsLast, d); diffSqLast += d * d; refSqLast += ref[v].toDouble() * ref[v] }
            }
            if (argmax(ref) == argmax(art)) agree++
            val lp = logSoftmax(ref); val lq = logSoftmax(art)
            var sum = 0.0
            for (v in lp.indices) sum += exp(lp[v]) * (lp[v] - lq[v])
            kl[p] = sum
        }
        return linkedMapOf(
            "max_abs_logits" to maxAbs,
            "max_abs_last_logits" to maxAbsLast,
            "rel_l2_logits" to sqrt(diffSq) / max(sqrt(refSq), 1e-30),
            "rel_l2_last_logits" to sqrt(diffSqLast) / max(sqrt(refSqLast), 1e-30),
            "top1_agreement" to agree.toDouble() / reference.size,
            "kl_mean" to max(kl.average(), 0.0),
            "kl_max" to max(kl.maxOrNull() ?: 0.0, 0.0),
        )
    }

    /** Mean negative log-likelihood of ids[1:] given the logits at the positions before them. */
    fun nextTokenNll(logits: Array<FloatArray>, ids: LongArray): Double {
        var sum = 0.0
        for (p in 0 until ids.size - 1) sum -= logSoftmax(logits[p])[ids[p + 1].toInt()]
        return sum / (ids.size - 1)
    }

    fun firstDivergence(a: LongArray, b: LongArray): Int? {
        for (i in 0 until minOf(a.size, b.size)) if (a[i] != b[i]) return i
        return if (a.size == b.size) null else minOf(a.size, b.size)
    }

    class Result(val perPrompt: List<Map<String, Any?>>, val metrics: Map<String, Double>)

    /** runtimes/validation.py compare: each prompt in two chunks (prefill, then a continuation on the KV
     * cache), so the cache path is checked too; greedy tokens against the reference's. */
    fun compare(engine: Engine, golden: Golden): Result {
        val perPrompt = ArrayList<MutableMap<String, Any?>>()
        for (i in golden.prompts.indices) {
            val ids = golden.prompts[i]
            val refArray = golden.logits[i]
            val reference = Array(refArray.rows) { refArray.row(it) }
            val split = max(1, ids.size / 2)
            val head = engine.forwardAll(ids.copyOfRange(0, split), 0)
            val tail = engine.forwardAll(ids.copyOfRange(split, ids.size), split)
            val artifact = arrayOf(*head, *tail)
            val metrics = logitMetrics(reference, artifact)
            metrics["nll_reference"] = nextTokenNll(reference, ids)
            metrics["nll_artifact"] = nextTokenNll(artifact, ids)
            val refTokens = golden.tokens[i]
            val divergence = firstDivergence(refTokens, engine.greedy(ids, refTokens.size))
            metrics["prompt_tokens"] = ids.size.toLong()
            metrics["greedy_tokens"] = refTokens.size.toLong()
            metrics["greedy_first_divergence"] = divergence?.toLong()
            metrics["greedy_match"] = if (divergence == null) 1.0 else divergence.toDouble() / refTokens.size
            perPrompt.add(metrics)
        }
        fun values(key: String) = perPrompt.map { (it[key] as Number).toDouble() }
        val worst = LinkedHashMap<String, Double>()
        for (key in listOf("max_abs_logits", "max_abs_last_logits", "rel_l2_logits", "rel_l2_last_logits", "kl_mean", "kl_max"))
            worst[key] = values(key).max()
        for (key in listOf("top1_agreement", "greedy_match")) worst[key] = values(key).min()
        // Perplexity of the prompts themselves (mean next-token NLL over all prompts), reference vs artifact.
        val counts = golden.prompts.map { (it.size - 1).toDouble() }
        val tokens = counts.sum()
        val nllRef = values("nll_reference").zip(counts).sumOf { (n, c) -> n * c } / tokens
        val nllArt = values("nll_artifact").zip(counts).sumOf { (n, c) -> n * c } / tokens
        worst["perplexity_reference"] = exp(nllRef)
        worst["perplexity_artifact"] = exp(nllArt)
        worst["perplexity_ratio"] = exp(nllArt - nllRef)
        return Result(perPrompt, worst)
    }

    data class Gate(val metric: String, val direction: String, val limit: Double, val value: Double) {
        val passed: Boolean get() = if (direction == "max") value <= limit else value >= limit

        /** compiler/validate.py GateResult.explain, with Python's %.3g. */
        fun explain(): String {
            val relation = if (direction == "max") "at most" else "at least"
            if (passed) return "$metric = ${g3(value)} ($relation ${g3(limit)})"
            val by = if (direction == "max") (if (limit != 0.0) "${g3(value / limit)}x the limit" else "by ${g3(value)}")
                else "short by ${g3(limit - value)}"
            return "$metric = ${g3(value)}, must be $relation ${g3(limit)} ($by)"
        }

        fun toJson(): Map<String, Any?> =
            linkedMapOf("metric" to metric, "direction" to direction, "limit" to limit, "value" to value, "passed" to passed)
    }

    /** compiler/validate.py gate_results: gates on metrics without a value (LoRA retention) are left out. */
    fun gateResults(metrics: Map<String, Double>, gates: Map<String, Pair<String, Double>>): Map<String, Any?> {
        val results = gates.filterKeys { it in metrics }.map { (name, gate) -> Gate(name, gate.first, gate.second, metrics.getValue(name)) }
        return linkedMapOf(
            "passed" to results.all { it.passed },
            "metrics" to metrics,
            "gates" to results.map { it.toJson() },
            "failures" to results.filter { !it.passed }.map { it.explain() },
            "summary" to results.map { it.explain() },
        )
    }

    /** What `python -m runtimes.validation` prints, so `edgec validate --device adb` reads either. */
    fun metricsJson(result: Result, runtime: Map<String, Any?>, device: Map<String, Any?>): Map<String, Any?> =
        linkedMapOf("metrics" to result.metrics, "prompts" to result.perPrompt, "runtime" to runtime, "device" to device)

    /** Python's '%.3g': rounded half-even on the exact binary value, as CPython's formatting does. */
    fun g3(x: Double): String {
        if (x.isNaN()) return "nan"
        if (x.isInfinite()) return if (x > 0) "inf" else "-inf"
        if (x == 0.0) return "0"
        val rounded = BigDecimal(x).round(MathContext(3, RoundingMode.HALF_EVEN))
        val exponent = rounded.precision() - rounded.scale() - 1
        if (exponent in -4..2) return rounded.stripTrailingZeros().toPlainString()
        val digits = rounded.unscaledValue().abs().toString().trimEnd('0')
        val mantissa = digits.take(1) + (if (digits.length > 1) "." + digits.drop(1) else "")
        return "${if (x < 0) "-" else ""}${mantissa}e${if (exponent < 0) "-" else "+"}${"%02d".format(Math.abs(exponent))}"
    }
}
