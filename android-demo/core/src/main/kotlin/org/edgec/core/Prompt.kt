package org.edgec.core

import java.io.File

/**
 * Chat prompt formatting from a bundle's tokenizer_config.json. Full Jinja is out of scope on the phone:
 * the template is recognised by its markers (ChatML, Llama 3, Llama 2 / Mistral [INST], Phi-3, Gemma) and
 * written by hand; an unknown or missing template falls back to the plain text with the BOS token.
 */
class ChatFormat(val style: Style, val bos: String = "", val eos: String = "") {
    enum class Style { CHATML, LLAMA3, INST, PHI3, GEMMA, PLAIN }

    data class Message(val role: String, val content: String)

    /** The prompt for `messages`, ending where the assistant's reply begins. */
    fun format(messages: List<Message>): String = buildString {
        when (style) {
            Style.CHATML -> {
                messages.forEach { append("<|im_start|>${it.role}\n${it.content}<|im_end|>\n") }
                append("<|im_start|>assistant\n")
            }
            Style.LLAMA3 -> {
                append(bos)
                messages.forEach { append("<|start_header_id|>${it.role}<|end_header_id|>\n\n${it.content.trim()}<|eot_id|>") }
                append("<|start_header_id|>assistant<|end_header_id|>\n\n")
            }
            Style.INST -> {
                // A system message goes in front of the first user turn, as Llama 2's template does.
                val system = messages.firstOrNull { it.role == "system" }?.content
                var first = true
                for (m in messages.filter { it.role != "system" }) {
                    if (m.role == "user") {
                        val text = if (first && system != null) "<<SYS>>\n$system\n<</SYS>>\n\n${m.content}" else m.content
                        append("$bos[INST] ${text.trim()} [/INST]")
                        first = false
                    } else append(" ${m.content.trim()}$eos")
                }
            }
            Style.PHI3 -> {
                messages.forEach { append("<|${it.role}|>\n${it.content}<|end|>\n") }
                append("<|assistant|>\n")
            }
            Style.GEMMA -> {
                append(bos)
                messages.filter { it.role != "system" }.forEach {
                    append("<start_of_turn>${if (it.role == "assistant") "model" else it.role}\n${it.content}<end_of_turn>\n")
                }
                append("<start_of_turn>model\n")
            }
            Style.PLAIN -> {
                append(bos)
                append(messages.joinToString("\n") { it.content })
            }
        }
    }

    companion object {
        fun fromTemplate(template: String?, bos: String = "", eos: String = ""): ChatFormat {
            val t = template ?: ""
            val style = when {
                "<|im_start|>" in t -> Style.CHATML
                "<|start_header_id|>" in t -> Style.LLAMA3
                "[INST]" in t -> Style.INST
                "<|assistant|>" in t -> Style.PHI3
                "<start_of_turn>" in t -> Style.GEMMA
                else -> Style.PLAIN
            }
            return ChatFormat(style, bos, eos)
        }

        /** From a bundle's tokenizer_config.json (absent: plain text). */
        fun fromBundle(dir: File): ChatFormat {
            val file = File(dir, "tokenizer_config.json")
            if (!file.isFile) return ChatFormat(Style.PLAIN)
            val config = Json.parse(file.readText())
            return fromTemplate(config.str("chat_template"), tokenText(config, "bos_token"), tokenText(config, "eos_token"))
        }

        // A special token is a string or an AddedToken object {"content": ...}.
        private fun tokenText(config: Any?, key: String): String {
            val value = (config as? Map<*, *>)?.get(key)
            return value as? String ?: (value as? Map<*, *>)?.get("content") as? String ?: ""
        }
    }
}
