package org.edgec.demo

import android.app.Activity
import android.os.Build
import android.os.Bundle
import org.edgec.core.Bench
import org.edgec.core.BenchSpec
import org.edgec.core.Golden
import org.edgec.core.Json
import org.edgec.core.Manifest
import org.edgec.core.SelfTest
import java.io.File

/**
 * Headless: `edgec bench|validate --device adb` starts it with intent extras (mode bench|selftest,
 * bundle_dir, format, prompt_tokens, new_tokens, repeats, warmup, threads, depths, output) and reads
 * files/<output>: the edgec.bench/1 result, the self-test metrics, or {"error": "..."}. Written to .tmp and
 * renamed, so the host never reads half a file.
 */
class BenchmarkActivity : Activity() {
    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val extras = intent.extras ?: Bundle()
        val output = File(filesDir, extras.getString("output") ?: "benchmark_results.json")
        Thread {
            val text = try {
                Json.write(run(extras), indent = 2)
            } catch (e: Throwable) {
                Json.write(mapOf("error" to "${e.javaClass.simpleName}: ${e.message}".lines().first()))
            }
            File(output.path + ".tmp").apply { writeText(text); renameTo(output) }
            finish()
        }.start()
    }

    private fun run(extras: Bundle): Map<String, Any?> {
        val manifest = Manifest.load(File(extras.getString("bundle_dir") ?: error("no bundle_dir extra")))
        val format = extras.getString("format")
        val threads = extras.getInt("threads", 0)
        val started = System.nanoTime()
        Engines.open(manifest, format, threads).use { engine ->
            val loadSeconds = (System.nanoTime() - started) / 1e9
            val runtime = mapOf("name" to engine.name, "version" to engine.version,
                "threads" to (if (threads > 0) threads else Runtime.getRuntime().availableProcessors()))
            if (extras.getString("mode") == "selftest") {
                val result = SelfTest.compare(engine, Golden.load(File(manifest.dir, Golden.FILE)))
                return SelfTest.metricsJson(result, runtime, deviceFacts())
            }
            val spec = BenchSpec(extras.getInt("prompt_tokens", 128), extras.getInt("new_tokens", 128),
                extras.getInt("warmup", 1), extras.getInt("repeats", 3), threads,
                depths = (extras.getString("depths") ?: "0").split(",").map { it.trim().toInt() })
            val vocab = ((manifest.json["model"] as Map<*, *>)["vocab_size"] as Number).toInt()
            val byDepth = Bench.run(engine, spec, vocab)
            val artifact = manifest.artifact(format)
            return Bench.resultJson(runtime, deviceFacts(),
                mapOf("path" to manifest.dir.path, "format" to artifact.format,
                    "manifest_sha256" to Manifest.sha256(File(manifest.dir, Manifest.FILE))),
                spec, loadSeconds, byDepth, Bench.peakRssMb(File("/proc/self/status").readText()),
                manifest.files.filter { it.name.startsWith(artifact.path) }.sumOf { it.bytes })
        }
    }

    private fun deviceFacts(): Map<String, Any?> = mapOf("name" to Build.MODEL, "arch" to Build.SUPPORTED_ABIS.first(),
        "os" to "Android ${Build.VERSION.RELEASE}", "cpu_count" to Runtime.getRuntime().availableProcessors())
}
