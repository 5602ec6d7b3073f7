// The thin Android layer over :core. NOT compiled or run where edgec is developed (no Android SDK there):
// written against the documented APIs of ExecuTorch's and ONNX Runtime's Android packages.
plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "org.edgec.demo"
    compileSdk = 35
    defaultConfig {
        applicationId = "org.edgec.demo"
        minSdk = 28
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        ndk { abiFilters += listOf("arm64-v8a", "x86_64") }
    }
    buildTypes {
        release {
            isMinifyEnabled = false
            signingConfig = signingConfigs.getByName("debug")  // a demo: installable without a release key
        }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
}

dependencies {
    implementation(project(":core"))
    implementation("org.pytorch:executorch-android:0.7.0")
    implementation("com.facebook.fbjni:fbjni:0.7.0")
    implementation("com.microsoft.onnxruntime:onnxruntime-android:1.22.0")
    // onnxruntime-genai's Android AAR: build it from github.com/microsoft/onnxruntime-genai and put it here.
    implementation(files("libs/onnxruntime-genai-android.aar"))
}
