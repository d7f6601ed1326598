import SwiftUI

/// The ZTNA app: configures and starts the packet tunnel extension and shows what
/// the agent inside it reports.
@main
struct ZtnaApp: App {
    @StateObject private var tunnel = TunnelController()

    var body: some Scene {
        WindowGroup("ZTNA") {
            ContentView()
                .environmentObject(tunnel)
                .frame(minWidth: 680, minHeight: 620)
                .task {
                    await tunnel.load()
                }
        }
    }
}
