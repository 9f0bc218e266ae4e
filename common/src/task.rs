//! Small helpers for tokio tasks that both daemons use.

/// A task aborted when this guard is dropped: a helper task (a stream's reader, a pump)
/// that must not outlive the code that started it, however that code ends.
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_task_ends_with_its_guard() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let guard = AbortOnDrop(tokio::spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        }));
        drop(guard);
        // The sender goes with the aborted task.
        assert!(rx.await.is_err());
    }
}
