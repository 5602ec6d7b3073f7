package org.edgec.demo

import android.app.Activity
import android.os.Bundle
import android.widget.Button
import android.widget.EditText
import android.widget.LinearLayout
import android.widget.ScrollView
import android.widget.TextView
import org.edgec.core.ChatEngine
import org.edgec.core.ChatFormat
import org.edgec.core.Golden
import org.edgec.core.Manifest
import org.edgec.core.SelfTest
import java.io.File

/**
 * Pick a bundle directory (a path: the runtimes load files by path, which a content:// URI from the system
 * picker is not), chat with streamed tokens and tokens/s, and run the self-test against golden.npz.
 */
class MainActivity : Activity() {
    private lateinit var log: TextView
    private var chat: ChatEngine? = null
    private var format: ChatFormat? = null
    private val history = ArrayList<ChatFormat.Message>()

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val path = EditText(this).apply { setText("/data/local/tmp/edgec/bundles/"); hint = "bundle directory" }
        val input = EditText(this).apply { hint = "message" }
        log = TextView(this)
        val layout = LinearLayout(this).apply {
            orientation = LinearLayout.VERTICAL
            addView(path)
            addView(Button(this@MainActivity).apply { text = "Load"; setOnClickListener { load(File(path.text.toString())) } })
            addView(Button(this@MainActivity).apply { text = "Self-test"; setOnClickListener { selfTest(File(path.text.toString())) } })
            addView(input)
            addView(Button(this@MainActivity).apply { text = "Send"; setOnClickListener { send(input.text.toString()); input.setText("") } })
            addView(ScrollView(this@MainActivity).apply { addView(log) })
        }
        setContentView(layout)
    }

    private fun say(text: String) = runOnUiThread { log.append(text) }

    private fun background(work: () -> Unit) = Thread {
        try { work() } catch (e: Throwable) { say("\nerror: ${e.message}\n") }
    }.start()

    private fun load(dir: File) = background {
        val manifest = Manifest.load(dir)
        val broken = manifest.verify()
        if (broken.isNotEmpty()) { say("bundle damaged: ${broken.joinToString("; ")}\n"); return@background }
        chat?.close()
        chat = Engines.openChat(manifest)
        format = ChatFormat.fromBundle(dir)
        history.clear()
        say("loaded ${dir.name} (${manifest.artifact().format}, ${manifest.artifact().precision})\n")
    }

    private fun send(text: String) = background {
        val engine = chat ?: run { say("load a bundle first\n"); return@background }
        history.add(ChatFormat.Message("user", text))
        say("\n> $text\n")
        val reply = StringBuilder()
        val stats = engine.generate(format!!.format(history), 256) { piece -> reply.append(piece); say(piece) }
        history.add(ChatFormat.Message("assistant", reply.toString()))
        say("\n(%d tokens, %.1f tokens/s)\n".format(stats.newTokens, stats.decodeTokensPerSecond))
    }

    private fun selfTest(dir: File) = background {
        val manifest = Manifest.load(dir)
        say("self-test of ${dir.name}...\n")
        for (artifact in manifest.artifacts.filter { it.format == "onnx" || it.format == "pte" }) {
            Engines.open(manifest, artifact.format).use { engine ->
                val result = SelfTest.compare(engine, Golden.load(File(dir, Golden.FILE)))
                val verdict = SelfTest.gateResults(result.metrics,
                    SelfTest.gates(artifact.precision, SelfTest.gateOverrides(manifest)))
                say("${artifact.format}: ${if (verdict["passed"] == true) "PASSED" else "FAILED"}\n")
                (verdict["summary"] as List<*>).forEach { say("  $it\n") }
            }
        }
    }

    override fun onDestroy() {
        chat?.close()
        super.onDestroy()
    }
}
