// The edgec demo app: `core` is plain Kotlin/JVM (tested on the host by `make android-core-test`),
// `app` is the thin Android layer over it.
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}
dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
        // onnxruntime-genai's Android AAR is not on Maven Central: build it from its repo, drop it in app/libs.
        flatDir { dirs("app/libs") }
    }
}
rootProject.name = "edgec-demo"
include(":core", ":app")
